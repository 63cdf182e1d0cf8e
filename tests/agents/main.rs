//! Agents end to end: the real `sentinel` binary in front of a test
//! upstream, with scriptable agents (`support::agent`) on Unix sockets,
//! gRPC and HTTP.
//!
//! - `decisions`: allow, block, redirect, challenge; header mutations;
//!   several agents on one route; the response phase; `request_complete`;
//! - `bodies`: buffer, stream and hybrid modes, body mutations, the waf
//!   body-inspection pipeline and decompression (bombs, corrupt streams,
//!   both failure modes), guardrails, WebSocket frames;
//! - `faults`: agents not running, killed, hanging, talking garbage,
//!   oversized or of another version; the circuit breaker; a thousand
//!   concurrent requests on one Unix-socket connection;
//! - `transports`: gRPC and HTTP, with TLS and mutual TLS;
//! - `kernel`: an agent's kernel push, end to end in a network namespace;
//! - `reference`: the SDK's echo and denylist agents beside the daemon.

mod bodies;
mod decisions;
mod faults;
mod kernel;
mod reference;
mod transports;

use sentinel_tests::{
    self as support,
    agent::ScriptAgent,
    daemon::{Daemon, DaemonConfig},
    http::Upstream,
};

fn skip() -> bool {
    support::skip_unless_root("needs root (a running daemon loads BPF)")
}

/// One agent as KDL: `agent "name" type="..." { <transport>; <options> }`.
fn agent(name: &str, kind: &str, transport: &str, options: &str) -> String {
    format!(
        "    agent \"{name}\" type=\"{kind}\" {{\n        {transport}\n        {options}\n    }}\n"
    )
}

/// `unix-socket "PATH"` for a script agent.
fn unix(a: &ScriptAgent) -> String {
    format!("unix-socket \"{}\"", a.address)
}

/// `filter "name" { type "agent"; agent "..."; <options> }`.
fn filter(name: &str, agent: &str, options: &str) -> String {
    format!(
        "    filter \"{name}\" {{\n        type \"agent\"\n        agent \"{agent}\"\n        {options}\n    }}\n"
    )
}

/// A daemon with one listener and a route `app` to `upstream` through
/// `filters` (names), the given agents and filters, and `more` blocks.
fn daemon(
    upstream: &Upstream,
    route_filters: &[&str],
    agents: &[String],
    filters: &[String],
    more: &str,
) -> Daemon {
    let names: Vec<String> = route_filters.iter().map(|f| format!("\"{f}\"")).collect();
    let filters_line = if names.is_empty() {
        String::new()
    } else {
        format!("filters {}", names.join(" "))
    };
    let mut blocks = format!(
        "listeners {{\n    listener \"http\" {{\n        address \"127.0.0.1:0\"\n    }}\n}}\n\
         routes {{\n    route \"app\" {{\n        upstream \"app\"\n        {filters_line}\n    }}\n}}\n\
         upstreams {{\n    upstream \"app\" {{\n        targets {{\n            target {{ address \"{}\"; }}\n        }}\n        retries 0\n    }}\n}}\n",
        upstream.target()
    );
    if !agents.is_empty() {
        blocks.push_str(&format!("agents {{\n{}}}\n", agents.concat()));
    }
    if !filters.is_empty() {
        blocks.push_str(&format!("filters {{\n{}}}\n", filters.concat()));
    }
    blocks.push_str(more);
    Daemon::start(DaemonConfig::default().with_blocks(&blocks))
}

fn metric(daemon: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    daemon.metric_value(name, labels).unwrap_or(0.0)
}
