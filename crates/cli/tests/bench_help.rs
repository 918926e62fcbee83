//! `hearth bench lifecycle|density|e2b|api --help` explain themselves (the benchmarks
//! themselves boot many VMs or run for long and are not run in the test suite).

use std::process::Command;

fn help(sub: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bench", sub, "--help"])
        .output()
        .expect("running hearth");
    assert!(out.status.success(), "bench {sub} --help failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn lifecycle_help_names_its_options() {
    let h = help("lifecycle");
    for want in ["--samples", "--images", "--accel", "--out-dir", "--json"] {
        assert!(h.contains(want), "no {want} in:\n{h}");
    }
}

#[test]
fn density_help_names_its_options() {
    let h = help("density");
    for want in ["--count", "--parallel", "--images", "--out-dir", "PSS"] {
        assert!(h.contains(want), "no {want} in:\n{h}");
    }
}

#[test]
fn e2b_help_names_its_options() {
    let h = help("e2b");
    for want in [
        "--samples",
        "--template",
        "--python",
        "--out-dir",
        "install-test-deps",
    ] {
        assert!(h.contains(want), "no {want} in:\n{h}");
    }
}

#[test]
fn api_help_names_its_options() {
    let h = help("api");
    for want in [
        "--sandboxes",
        "--connections",
        "--requests",
        "--warmup",
        "--database-url",
        "--limit",
        "--out-dir",
    ] {
        assert!(h.contains(want), "no {want} in:\n{h}");
    }
}

#[test]
fn bench_help_lists_both() {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bench", "--help"])
        .output()
        .expect("running hearth");
    let h = String::from_utf8_lossy(&out.stdout);
    assert!(
        h.contains("lifecycle") && h.contains("density") && h.contains("e2b") && h.contains("api"),
        "{h}"
    );
}
