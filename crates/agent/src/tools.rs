//! Start-up check of the host tools the agent runs: QEMU, `qemu-img` (for qcow2
//! disks), `ip` and `nft`. A missing or broken tool stops the agent at start with
//! one message naming all of them, instead of failing every create later.
//! This module only runs `--version`-style commands; it changes nothing.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::{AgentConfig, DiskKind};

/// How long one tool gets to print its version.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// The tools `config` needs, as (program, version arguments).
pub(crate) fn needed(config: &AgentConfig) -> Vec<(PathBuf, &'static [&'static str])> {
    let mut v: Vec<(PathBuf, &'static [&'static str])> =
        vec![(config.qemu_binary.clone(), &["-version"])];
    if config.disk == DiskKind::Qcow2 {
        v.push(("qemu-img".into(), &["--version"]));
    }
    v.push(("ip".into(), &["-V"]));
    v.push(("nft".into(), &["--version"]));
    v
}

/// Run every needed tool; returns the ones that are missing or fail, each with why.
pub(crate) async fn missing(config: &AgentConfig) -> Vec<String> {
    let mut bad = Vec::new();
    for (program, args) in needed(config) {
        let run = tokio::process::Command::new(&program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        let why = match tokio::time::timeout(TOOL_TIMEOUT, run).await {
            Ok(Ok(st)) if st.success() => continue,
            Ok(Ok(st)) => format!("`{} {}` failed ({st})", program.display(), args.join(" ")),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                format!("{} not found", program.display())
            }
            Ok(Err(e)) => format!("{} could not run ({e})", program.display()),
            Err(_) => format!(
                "{} did not answer within {TOOL_TIMEOUT:?}",
                program.display()
            ),
        };
        bad.push(why);
    }
    bad
}
