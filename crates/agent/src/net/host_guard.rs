//! The host-wide nftables table `inet hearth_host`: only the host agent (root)
//! reaches a guest agent.
//!
//! Guests are routable from the host (10.11.0.0/16 via each sandbox's veth in
//! 10.12.0.0/16), so without a guard any local user, a LAN peer routing through a
//! host with forwarding on, or another sandbox could talk to a guest agent. The
//! table, created (atomically replaced) at every agent start and owned by the
//! agent, has three chains:
//! * `output`: packets to 10.11.0.0/16 or 10.12.0.0/16 from a socket whose owner is
//!   not uid 0 are rejected (the agent runs as root; packets the kernel sends for
//!   itself have no socket and pass).
//! * `forward`: nothing is forwarded to those ranges (the agent's own traffic is
//!   local, never forwarded: whatever is forwarded there came from a LAN peer or
//!   another namespace), nor from one sandbox veth (`hv*`) to another.
//! * `input`: a sandbox veth may only bring replies to connections the host
//!   opened (defence in depth: guests are already egress-denied in their netns).
//!
//! The table is left in place when the agent stops (its VMs keep running). Every
//! agent on the host installs the same table, so parallel agents do not conflict.
//!
//! Alternative considered: the agent connecting from inside each sandbox netns
//! (setns per connection), so the host needs no route to guests at all. It is as
//! strong, but costs a thread hop per connection in the proxy and a custom
//! connector, and still needs the netns's own rules; the table keeps the proven
//! routing and guards all three paths in one place.

use super::{run, NetError};

/// Name of the table (family `inet`).
pub const TABLE: &str = "hearth_host";
/// Guest-routable and veth ranges the guard protects.
pub const GUARDED: &str = "10.11.0.0/16, 10.12.0.0/16";

/// The ruleset `install` loads: the table is created if missing, then deleted and
/// recreated in the same transaction, so the rules are never half there.
pub fn ruleset() -> String {
    format!(
        "table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain output {{
    type filter hook output priority filter; policy accept;
    ip daddr {{ {GUARDED} }} meta skuid != 0 counter reject with icmpx type admin-prohibited
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip daddr {{ {GUARDED} }} counter drop
    iifname \"hv*\" oifname \"hv*\" counter drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"hv*\" ct state established,related accept
    iifname \"hv*\" counter drop
  }}
}}
"
    )
}

/// Create or replace the table. Idempotent.
pub async fn install() -> Result<(), NetError> {
    run("nft", &["-f", "-"], Some(&ruleset())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_guards_all_three_paths() {
        let r = ruleset();
        assert!(r.starts_with("table inet hearth_host\ndelete table inet hearth_host\n"));
        assert!(r.contains("meta skuid != 0 counter reject"));
        assert!(r.contains("ip daddr { 10.11.0.0/16, 10.12.0.0/16 } counter drop"));
        assert!(r.contains("iifname \"hv*\" oifname \"hv*\" counter drop"));
        assert!(r.contains("iifname \"hv*\" ct state established,related accept"));
    }
}
