//! `hearth e2b env`: the environment that points a program written for E2B's SDKs at
//! this hearth, unchanged: the API and the sandbox proxy are the same server (the SDKs
//! send sandbox traffic to `E2B_SANDBOX_URL` with `E2b-Sandbox-Id`/`-Port` headers),
//! and the API key is a hearth API key.

use anyhow::Result;
use clap::Subcommand;

use crate::{config, Global};

#[derive(Subcommand)]
pub enum E2bCmd {
    /// Print `export` lines (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY) for E2B's SDKs;
    /// use as `eval "$(hearth e2b env)"`, or `--json` for scripts.
    #[command(
        after_help = "Example:\n  eval \"$(hearth e2b env)\"\n  python3 -c 'from e2b import Sandbox; s = Sandbox.create(); print(s.commands.run(\"uname -r\").stdout); s.kill()'"
    )]
    Env,
}

/// The variables, in print order.
pub fn variables(url: &str, api_key: &str) -> Vec<(&'static str, String)> {
    let url = url.trim_end_matches('/').to_owned();
    vec![
        ("E2B_API_URL", url.clone()),
        ("E2B_SANDBOX_URL", url),
        ("E2B_API_KEY", api_key.to_owned()),
    ]
}

/// `value` as one POSIX shell word.
fn shell_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@%+=,".contains(&b))
    {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\'', r"'\''"))
}

pub fn run(g: &Global, cmd: E2bCmd) -> Result<()> {
    match cmd {
        E2bCmd::Env => {
            let creds = config::resolve(g.url.clone(), g.api_key.clone())?;
            let vars = variables(&creds.url, &creds.api_key);
            if g.json {
                let map: serde_json::Map<String, serde_json::Value> = vars
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                    .collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                for (k, v) in vars {
                    println!("export {k}={}", shell_quote(&v));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_point_api_and_sandboxes_at_one_server() {
        let v = variables("http://127.0.0.1:7420/", "hk_x");
        assert_eq!(v[0], ("E2B_API_URL", "http://127.0.0.1:7420".into()));
        assert_eq!(v[1], ("E2B_SANDBOX_URL", "http://127.0.0.1:7420".into()));
        assert_eq!(v[2], ("E2B_API_KEY", "hk_x".into()));
    }

    #[test]
    fn values_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("http://h:1/x"), "http://h:1/x");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's$(x)"), r"'it'\''s$(x)'");
        assert_eq!(shell_quote(""), "''");
    }
}
