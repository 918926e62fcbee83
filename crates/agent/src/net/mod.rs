//! Per-sandbox networking: one network namespace per sandbox, wired as in
//! docs/contracts.md.
//!
//! Owns the [`NetworkProvider`] trait, the namespace/veth/tap/nftables plumbing of
//! [`NetnsProvider`] and the host-wide slot claims in [`slots`]. Setup is
//! all-or-nothing: a failure undoes what was done. It does not start VMs.
//!
//! ```text
//! host: hv<n> 10.12.x.y/31 ── veth ── ns hearth-<sb>: eth0 10.12.x.y+1/31
//!       route 10.11.a.b/32 via ns          DNAT 10.11.a.b -> 169.254.0.21
//!                                          tap0 169.254.0.22/30 ── guest 169.254.0.21
//! ```
//! The namespace's forward chain admits new connections only from `eth0` to the
//! guest plus established/related replies: everything the guest starts is dropped.
//! On the host, [`host_guard`]'s table lets only root's sockets reach the guest
//! and veth ranges.

pub mod host_guard;
pub mod slots;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;

use hearth_types::SandboxId;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tracing::warn;

/// The guest's address on its tap link.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The namespace end of the tap link (the guest's gateway).
pub const TAP_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// The guest NIC's MAC address. Every guest sits alone in its own namespace, so
/// one fixed address suffices; the namespace holds a permanent neighbour entry
/// for it, so the first packet to a freshly booted guest needs no ARP round
/// (a failed ARP entry otherwise delays the first health answer by up to ~1 s).
pub const GUEST_MAC: &str = "02:68:65:61:72:01";
/// The tap's (the guest's gateway's) MAC address, the same in every namespace:
/// a guest restored into another slot keeps its ARP entry for its gateway, and
/// frames to a MAC the new tap does not have would be dropped.
pub const TAP_MAC: &str = "02:68:65:61:72:02";
/// Name of the tap device inside every sandbox namespace.
pub const TAP_NAME: &str = "tap0";
/// Name of the namespace end of the veth pair.
pub const NS_VETH: &str = "eth0";
/// Highest slot: keeps `2n+1` inside 10.12.0.0/16 and `n` inside 10.11.0.0/16.
pub const MAX_SLOT: u32 = 16383;

/// Addresses derived from a slot (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAddrs {
    pub host_veth: Ipv4Addr,
    pub ns_veth: Ipv4Addr,
    pub guest_routable: Ipv4Addr,
}

/// Address math from docs/contracts.md. `None` outside `1..=MAX_SLOT`.
pub fn slot_addrs(slot: u32) -> Option<SlotAddrs> {
    if slot == 0 || slot > MAX_SLOT {
        return None;
    }
    let two_n = 2 * slot;
    let host_veth = Ipv4Addr::new(10, 12, (two_n / 256) as u8, (two_n % 256) as u8);
    let ns_veth = Ipv4Addr::from(u32::from(host_veth) + 1);
    let guest_routable = Ipv4Addr::new(10, 11, (slot / 256) as u8, (slot % 256) as u8);
    Some(SlotAddrs {
        host_veth,
        ns_veth,
        guest_routable,
    })
}

/// Name of the sandbox's namespace.
pub fn netns_name(id: &SandboxId) -> String {
    format!("hearth-{id}")
}

/// Name of the host end of the veth pair for `slot`.
pub fn host_veth_name(slot: u32) -> String {
    format!("hv{slot}")
}

/// What a sandbox's network looks like once set up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNet {
    pub slot: u32,
    pub netns: String,
    pub host_veth: String,
    pub tap: String,
    /// Where the host reaches the guest agent (routable address and port).
    pub guest_address: SocketAddr,
}

impl SandboxNet {
    /// The network a sandbox in `slot` gets (no side effects).
    pub fn planned(slot: u32, id: &SandboxId) -> Option<Self> {
        let a = slot_addrs(slot)?;
        Some(Self {
            slot,
            netns: netns_name(id),
            host_veth: host_veth_name(slot),
            tap: TAP_NAME.to_owned(),
            guest_address: SocketAddr::new(a.guest_routable.into(), hearth_proto::GUEST_AGENT_PORT),
        })
    }
}

/// Errors of network setup and teardown.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("slot {slot} is outside 1..={MAX_SLOT}")]
    BadSlot { slot: u32 },
    #[error("could not run {program}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error(transparent)]
    Slots(#[from] slots::SlotError),
}

/// Sets up and tears down a sandbox's network.
#[async_trait::async_trait]
pub trait NetworkProvider: Send + Sync + 'static {
    /// Build the sandbox's network for a claimed slot. All-or-nothing.
    async fn setup(&self, slot: u32, id: &SandboxId) -> Result<SandboxNet, NetError>;
    /// Remove everything `net` describes. Idempotent; missing parts are fine.
    async fn teardown(&self, net: &SandboxNet) -> Result<(), NetError>;
}

/// The real provider: `ip` and `nft` (their output is never parsed).
#[derive(Debug, Clone, Default)]
pub struct NetnsProvider;

/// The nftables ruleset loaded inside a sandbox namespace. An `inet` table, so its
/// drop policies hold for IPv6 as well as IPv4.
pub fn ns_ruleset(guest_routable: Ipv4Addr) -> String {
    format!(
        "table inet hearth {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{NS_VETH}\" ip daddr {guest_routable} dnat ip to {GUEST_IP}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"{NS_VETH}\" oifname \"{TAP_NAME}\" ip daddr {GUEST_IP} ct state new accept
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{TAP_NAME}\" ct state established,related accept
    iifname \"{TAP_NAME}\" drop
  }}
}}
"
    )
}

async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), NetError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let exec_err = |source| NetError::Exec {
        program: program.to_owned(),
        source,
    };
    let mut child = cmd.spawn().map_err(exec_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await.map_err(exec_err)?;
        drop(pipe);
    }
    let out = child.wait_with_output().await.map_err(exec_err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

impl NetnsProvider {
    async fn build(&self, net: &SandboxNet, a: &SlotAddrs) -> Result<(), NetError> {
        let ns = net.netns.as_str();
        let hv = net.host_veth.as_str();
        // We own the slot, so a host veth of that name is a leftover: remove it.
        let _ = run("ip", &["link", "del", hv], None).await;
        run("ip", &["netns", "add", ns], None).await?;
        run(
            "ip",
            &[
                "link", "add", hv, "type", "veth", "peer", "name", NS_VETH, "netns", ns,
            ],
            None,
        )
        .await?;
        let host_cidr = format!("{}/31", a.host_veth);
        run("ip", &["addr", "add", &host_cidr, "dev", hv], None).await?;
        run("ip", &["link", "set", hv, "up"], None).await?;
        let batch = format!(
            "addr add {}/31 dev {NS_VETH}\nlink set {NS_VETH} up\nlink set lo up\n\
             tuntap add dev {TAP_NAME} mode tap\nlink set {TAP_NAME} address {TAP_MAC}\n\
             addr add {TAP_IP}/30 dev {TAP_NAME}\nlink set {TAP_NAME} up\n\
             neigh replace {GUEST_IP} lladdr {GUEST_MAC} dev {TAP_NAME} nud permanent\n",
            a.ns_veth
        );
        run("ip", &["-n", ns, "-batch", "-"], Some(&batch)).await?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
            None,
        )
        .await?;
        run(
            "ip",
            &["netns", "exec", ns, "nft", "-f", "-"],
            Some(&ns_ruleset(a.guest_routable)),
        )
        .await?;
        let guest = format!("{}/32", a.guest_routable);
        let via = a.ns_veth.to_string();
        run(
            "ip",
            &["route", "replace", &guest, "via", &via, "dev", hv],
            None,
        )
        .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl NetworkProvider for NetnsProvider {
    async fn setup(&self, slot: u32, id: &SandboxId) -> Result<SandboxNet, NetError> {
        let net = SandboxNet::planned(slot, id).ok_or(NetError::BadSlot { slot })?;
        let addrs = slot_addrs(slot).ok_or(NetError::BadSlot { slot })?;
        if let Err(e) = self.build(&net, &addrs).await {
            if let Err(undo) = self.teardown(&net).await {
                warn!(sandbox_id = %id, error = %undo, "undoing a failed network setup failed");
            }
            return Err(e);
        }
        Ok(net)
    }

    async fn teardown(&self, net: &SandboxNet) -> Result<(), NetError> {
        let mut first_err = None;
        if PathBuf::from("/run/netns").join(&net.netns).exists() {
            if let Err(e) = run("ip", &["netns", "del", &net.netns], None).await {
                first_err.get_or_insert(e);
            }
        }
        // Deleting the namespace destroys eth0 and with it its peer; this catches
        // a pair whose namespace end never got there.
        if PathBuf::from("/sys/class/net")
            .join(&net.host_veth)
            .exists()
        {
            if let Err(e) = run("ip", &["link", "del", &net.host_veth], None).await {
                if PathBuf::from("/sys/class/net")
                    .join(&net.host_veth)
                    .exists()
                {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_address_math_matches_the_contract() {
        let a = slot_addrs(1).unwrap();
        assert_eq!(a.host_veth, Ipv4Addr::new(10, 12, 0, 2));
        assert_eq!(a.ns_veth, Ipv4Addr::new(10, 12, 0, 3));
        assert_eq!(a.guest_routable, Ipv4Addr::new(10, 11, 0, 1));
        let a = slot_addrs(300).unwrap();
        assert_eq!(a.host_veth, Ipv4Addr::new(10, 12, 2, 88));
        assert_eq!(a.ns_veth, Ipv4Addr::new(10, 12, 2, 89));
        assert_eq!(a.guest_routable, Ipv4Addr::new(10, 11, 1, 44));
        let a = slot_addrs(MAX_SLOT).unwrap();
        assert_eq!(a.ns_veth, Ipv4Addr::new(10, 12, 127, 255));
        assert!(slot_addrs(0).is_none());
        assert!(slot_addrs(MAX_SLOT + 1).is_none());
    }

    #[test]
    fn every_slot_gets_distinct_addresses() {
        let mut seen = std::collections::HashSet::new();
        for s in 1..=MAX_SLOT {
            let a = slot_addrs(s).unwrap();
            assert!(seen.insert(a.host_veth) && seen.insert(a.ns_veth));
            assert!(seen.insert(a.guest_routable));
            // The /31 pair never straddles two slots.
            assert_eq!(u32::from(a.host_veth) % 2, 0);
        }
    }

    #[test]
    fn ruleset_denies_guest_initiated_traffic() {
        let r = ns_ruleset(Ipv4Addr::new(10, 11, 0, 7));
        assert!(r.contains("policy drop"));
        assert!(r.contains("table inet hearth"));
        assert!(r.contains("ip daddr 10.11.0.7 dnat ip to 169.254.0.21"));
        assert!(!r.contains("iifname \"tap0\" accept"));
    }

    #[test]
    fn planned_net_names() {
        let id: SandboxId = "sb-abcdefghijklmnop".parse().unwrap();
        let n = SandboxNet::planned(5, &id).unwrap();
        assert_eq!(n.netns, "hearth-sb-abcdefghijklmnop");
        assert_eq!(n.host_veth, "hv5");
        assert_eq!(n.guest_address.to_string(), "10.11.0.5:49983");
    }
}
