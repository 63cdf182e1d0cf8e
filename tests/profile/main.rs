//! The runtime profile end to end through the real binary: operation modes
//! (per route, changed by reload), secure response headers, request
//! metadata records, the local store and the collector.
//!
//! - `modes`: off, lite, monitor and protection on one daemon, and a reload;
//! - `headers`: secure headers with and without upstream values, HSTS on
//!   TLS only, per-route switches.

mod headers;
mod modes;

use sentinel_tests::{
    self as support,
    agent::ScriptAgent,
    daemon::{Daemon, DaemonConfig},
};

fn skip() -> bool {
    support::skip_unless_root("needs root (a running daemon loads BPF)")
}

fn unix(a: &ScriptAgent) -> String {
    format!("unix-socket \"{}\"", a.address)
}

fn start(blocks: &str) -> Daemon {
    Daemon::start(DaemonConfig::default().with_blocks(blocks))
}

fn metric(daemon: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    daemon.metric_value(name, labels).unwrap_or(0.0)
}
