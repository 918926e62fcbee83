//! Wire definitions shared by every RPC hop.
//!
//! * `process` and `filesystem`: the guest agent's services. They carry the same
//!   package, message names and field numbers as E2B's `envd`, so E2B SDKs can talk to
//!   a hearth guest unchanged.
//! * `hearth::agent::v1`: the host agent's lifecycle service used by the control plane.
//!
//! This crate owns no logic: generated code plus a few constants.
#![allow(clippy::all)]

connectrpc::include_generated!();

/// TCP port the guest agent (envd-compatible) listens on inside every VM.
pub const GUEST_AGENT_PORT: u16 = 49983;

/// Header carrying the host agent's shared secret on every control plane -> agent call.
/// Not `Authorization`: that one belongs to envd (the guest user rides in it) and passes
/// through the agent's proxy; this one never reaches a guest.
pub const AGENT_TOKEN_HEADER: &str = "x-hearth-agent-token";
