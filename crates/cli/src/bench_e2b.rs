//! `hearth bench e2b`: E2B's own Python SDK against hearth beside hearth's own API, in
//! one run. A sample is create + run `true` + destroy: through the SDK
//! (`Sandbox.create()`, `commands.run("true")`, `kill()`, driven by
//! tests/e2b/bench/driver.py, embedded here, in the SDK's venv) and through `/v1`
//! (POST sandboxes, exec, DELETE), alternating so that both see the same load. The
//! native exec runs what the SDK runs (`/bin/bash -l -c true` as `user`), so the
//! ratio measures the E2B surface and proxy, not a different command. Talks to the
//! server the CLI is configured for (`hearth up`'s by default).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};

use super::{progress, round1, summary};
use crate::{client::Client, config, Global};

/// The SDK side's driver (one sample per `go` line).
const DRIVER: &str = include_str!("../../../tests/e2b/bench/driver.py");
/// The goal: the SDK's total at most this many times hearth's own.
const GOAL_RATIO: f64 = 1.2;

#[derive(Args)]
pub struct E2bBench {
    /// Samples of each (SDK and native), alternating.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Template for both (the SDK's `base` is hearth's `python`).
    #[arg(long, default_value = "python")]
    pub template: String,
    /// Python with E2B's SDK (scripts/install-test-deps.sh makes this venv).
    #[arg(long, default_value = "/var/lib/hearth/test/e2b-venv/bin/python3")]
    pub python: PathBuf,
    /// Where to write the results file.
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
}

/// The SDK driver process.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _script: tempfile::NamedTempFile,
}

impl Driver {
    fn start(b: &E2bBench, url: &str, api_key: &str) -> Result<Driver> {
        if !b.python.exists() {
            bail!(
                "{} not found: run scripts/install-test-deps.sh (it makes a venv with E2B's SDK) or pass --python",
                b.python.display()
            );
        }
        let mut script = tempfile::Builder::new()
            .prefix("hearth-e2b-bench-")
            .suffix(".py")
            .tempfile()?;
        script.write_all(DRIVER.as_bytes())?;
        let mut cmd = Command::new(&b.python);
        cmd.arg(script.path())
            .arg(&b.template)
            .env_remove("E2B_DOMAIN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in crate::e2b::variables(url, api_key) {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", b.python.display()))?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("driver stdout")?);
        let mut d = Driver {
            child,
            stdin,
            stdout,
            _script: script,
        };
        let ready = d.line()?;
        if ready["ready"] != true {
            bail!("the SDK driver did not start: {ready}");
        }
        Ok(d)
    }

    fn line(&mut self) -> Result<Value> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            bail!("the SDK driver ended early (its errors are above)");
        }
        serde_json::from_str(&s).with_context(|| format!("driver said {s:?}"))
    }

    /// One SDK sample: (create, run, kill, total) in ms.
    fn sample(&mut self) -> Result<[f64; 4]> {
        writeln!(self.stdin, "go")?;
        self.stdin.flush()?;
        let v = self.line()?;
        if let Some(e) = v["error"].as_str() {
            bail!("the E2B SDK failed: {e}");
        }
        let f = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {v}"));
        Ok([f("create_ms")?, f("run_ms")?, f("kill_ms")?, f("total_ms")?])
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// One native sample through `/v1`: (create, exec, destroy, total) in ms.
async fn native(c: &Client, template: &str) -> Result<[f64; 4]> {
    let t0 = Instant::now();
    let sb: Value = c
        .json(
            c.request(Method::POST, "/v1/sandboxes")
                .json(&json!({"template": template, "timeout_s": 120})),
        )
        .await?;
    let id = sb["id"]
        .as_str()
        .context("create returned no id")?
        .to_owned();
    let t1 = Instant::now();
    let r: Value = c
        .json(
            c.request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .json(&json!({"cmd": ["/bin/bash", "-l", "-c", "true"], "user": "user"})),
        )
        .await?;
    let t2 = Instant::now();
    c.send(c.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
        .await?;
    let t3 = Instant::now();
    if r["exit_code"] != 0 {
        bail!("native exec of `true` failed: {r}");
    }
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
    Ok([ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t0, t3)])
}

pub async fn run(g: &Global, b: E2bBench) -> Result<()> {
    if b.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let creds = config::resolve(g.url.clone(), g.api_key.clone())?;
    let c = Client::new(creds.clone())?;
    let mut driver = Driver::start(&b, &creds.url, &creds.api_key)?;
    let mut sdk: Vec<[f64; 4]> = Vec::new();
    let mut nat: Vec<[f64; 4]> = Vec::new();
    for i in 0..b.samples {
        // Alternate which goes first, so neither always follows the other.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for use_sdk in order {
            if use_sdk {
                let s = driver.sample()?;
                progress(&format!("sdk    {}/{}: {:.1} ms", i + 1, b.samples, s[3]));
                sdk.push(s);
            } else {
                let s = native(&c, &b.template).await?;
                progress(&format!("native {}/{}: {:.1} ms", i + 1, b.samples, s[3]));
                nat.push(s);
            }
        }
    }
    drop(driver);
    report(g, &b, &sdk, &nat)
}

fn column(v: &[[f64; 4]], i: usize) -> Vec<f64> {
    v.iter().map(|s| s[i]).collect()
}

fn report(g: &Global, b: &E2bBench, sdk: &[[f64; 4]], nat: &[[f64; 4]]) -> Result<()> {
    let mut out = serde_json::Map::new();
    out.insert("benchmark".into(), json!("e2b"));
    out.insert("at".into(), json!(chrono::Utc::now().to_rfc3339()));
    out.insert("template".into(), json!(b.template));
    out.insert("samples".into(), json!(b.samples));
    for (side, v) in [("sdk", sdk), ("native", nat)] {
        for (i, phase) in ["create", "run", "destroy", "total"].iter().enumerate() {
            let (p50, p95) = summary(column(v, i));
            out.insert(format!("{side}_{phase}_p50_ms"), json!(round1(p50)));
            out.insert(format!("{side}_{phase}_p95_ms"), json!(round1(p95)));
        }
    }
    let (sdk_p50, _) = summary(column(sdk, 3));
    let (nat_p50, _) = summary(column(nat, 3));
    let ratio = (sdk_p50 / nat_p50 * 1000.0).round() / 1000.0;
    out.insert("sdk_over_native_p50".into(), json!(ratio));
    out.insert("goal_sdk_over_native_max".into(), json!(GOAL_RATIO));
    out.insert("goal_met".into(), json!(ratio <= GOAL_RATIO));
    out.insert(
        "raw_ms".into(),
        json!({"sdk": sdk, "native": nat, "columns": ["create", "run", "destroy", "total"]}),
    );
    let result = Value::Object(out);
    std::fs::create_dir_all(&b.out_dir)
        .with_context(|| format!("creating {}", b.out_dir.display()))?;
    let file = b.out_dir.join(format!(
        "e2b-{}.json",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    std::fs::write(&file, serde_json::to_vec_pretty(&result)?)?;
    if g.json {
        println!("{result}");
        return Ok(());
    }
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10}",
        "", "create", "run", "destroy", "total"
    );
    for (side, v) in [("sdk", sdk), ("native", nat)] {
        let p = |i: usize| summary(column(v, i));
        for (label, pick) in [("p50", 0usize), ("p95", 1)] {
            let cells: Vec<String> = (0..4)
                .map(|i| {
                    let (a, b) = p(i);
                    format!("{:>10.1}", if pick == 0 { a } else { b })
                })
                .collect();
            println!("{:<8} {}", format!("{side} {label}"), cells.join(" "));
        }
    }
    println!(
        "sdk/native total p50: {ratio} (goal <= {GOAL_RATIO}: {})",
        if ratio <= GOAL_RATIO { "met" } else { "missed" }
    );
    println!("written to {}", file.display());
    Ok(())
}
