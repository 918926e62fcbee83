//! The real network provider against the real kernel: namespaces, veth, tap,
//! routes and nftables, with all-or-nothing setup and idempotent teardown.
//! Sends no traffic anywhere.

use std::path::Path;

use hearth_agent::net::slots::Slots;
use hearth_agent::net::{NetnsProvider, NetworkProvider, SandboxNet};
use hearth_types::SandboxId;

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn ns_output(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn setup_builds_the_contract_network_and_teardown_removes_it() {
    let slots = Slots::new(hearth_agent::net::slots::DEFAULT_SLOTS_DIR);
    let id = SandboxId::generate();
    let run = tempfile::tempdir().unwrap();
    let slot = slots.claim(&id, run.path()).unwrap();
    let p = NetnsProvider;
    let net = p.setup(slot, &id).await.unwrap();
    let result = std::panic::AssertUnwindSafe(async {
        assert_eq!(net.netns, format!("hearth-{id}"));
        assert!(netns_exists(&net.netns));
        assert!(link_exists(&net.host_veth));
        let links = ns_output(&net.netns, &["ip", "-o", "link"]);
        assert!(links.contains("tap0") && links.contains("eth0"), "{links}");
        let fwd = ns_output(&net.netns, &["sysctl", "-n", "net.ipv4.ip_forward"]);
        assert_eq!(fwd.trim(), "1");
        let rules = ns_output(&net.netns, &["nft", "list", "ruleset"]);
        assert!(rules.contains("table inet hearth"), "{rules}");
        assert!(rules.contains("dnat ip to 169.254.0.21"), "{rules}");
        assert!(rules.contains("policy drop"), "{rules}");
        let guest_ip = net.guest_address.ip().to_string();
        let routes = std::process::Command::new("ip")
            .args(["route", "get", &guest_ip])
            .output()
            .unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(routes.contains(&net.host_veth), "{routes}");
        // The host's own forwarding setting is not touched.
    });
    let outcome = futures::FutureExt::catch_unwind(result).await;
    p.teardown(&net).await.unwrap();
    if let Err(panic) = outcome {
        slots.release(slot, &id).unwrap();
        std::panic::resume_unwind(panic);
    }
    assert!(!netns_exists(&net.netns));
    assert!(!link_exists(&net.host_veth));
    // Idempotent.
    p.teardown(&net).await.unwrap();
    assert!(slots.release(slot, &id).unwrap());
}

#[tokio::test]
async fn failed_setup_leaves_nothing() {
    let slots = Slots::new(hearth_agent::net::slots::DEFAULT_SLOTS_DIR);
    let id = SandboxId::generate();
    let run = tempfile::tempdir().unwrap();
    let slot = slots.claim(&id, run.path()).unwrap();
    let planned = SandboxNet::planned(slot, &id).unwrap();
    // A namespace of that name already exists: setup must fail and undo itself.
    let st = std::process::Command::new("ip")
        .args(["netns", "add", &planned.netns])
        .status()
        .unwrap();
    assert!(st.success());
    let err = NetnsProvider.setup(slot, &id).await.unwrap_err();
    assert!(err.to_string().contains("netns add"), "{err}");
    assert!(
        !netns_exists(&planned.netns),
        "namespace left after failed setup"
    );
    assert!(
        !link_exists(&planned.host_veth),
        "veth left after failed setup"
    );
    assert!(slots.release(slot, &id).unwrap());
}
