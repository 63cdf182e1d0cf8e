//! Sentinel's reference agents, written on `sentinel-agent-sdk`:
//!
//! - [`echo::EchoAgent`] (`sentinel-echo-agent`): marks every request with
//!   `X-Agent-Processed: true`, to check that the proxy reaches its agents.
//! - [`denylist::DenylistAgent`] (`sentinel-denylist-agent`): blocks
//!   requests by path prefix and client address, and asks the proxy to drop
//!   repeat offenders in the kernel.
//!
//! docs/agent-sdk.md shows how to run them beside the daemon.

pub mod denylist;
pub mod echo;
