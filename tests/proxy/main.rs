//! The reverse proxy end to end: the real `sentinel` binary with a generated
//! configuration, test upstreams and clients on loopback
//! (`support::http`), each test with its own daemon and upstreams on ports
//! the kernel picks.
//!
//! - `forwarding`: what reaches the upstream and the client, routing;
//! - `http1`: HTTP/1.1 and 1.0 on the client side (100-continue,
//!   chunked bodies, HEAD, keep-alive rules);
//! - `protocols`: h2c, TLS with ALPN and SNI, TLS versions, client
//!   certificates;
//! - `balancing`: load balancing, health checks, failures, retries;
//! - `limits`: header and body limits, slow and idle clients, connection
//!   caps, request smuggling;
//! - `streaming`: gigabyte bodies both ways, upgraded connections;
//! - `lifecycle`: reload, graceful shutdown, metrics and the access log.

mod answers;
mod balancing;
mod forwarding;
mod http1;
mod lifecycle;
mod limits;
mod protocols;
mod streaming;

use std::time::{Duration, Instant};

use sentinel_tests::{
    self as support,
    daemon::{Daemon, DaemonConfig},
    http::Upstream,
};

/// `true` (after saying so) when the test cannot run without root.
fn skip() -> bool {
    support::skip_unless_root("needs root (a running daemon loads BPF)")
}

/// `listener "name" { address "127.0.0.1:0"; <options> }`.
fn listener(name: &str, options: &str) -> String {
    format!(
        "    listener \"{name}\" {{\n        address \"127.0.0.1:0\"\n        {options}\n    }}\n"
    )
}

/// `route "name" { <body> }`.
fn route(name: &str, body: &str) -> String {
    format!("    route \"{name}\" {{\n        {body}\n    }}\n")
}

/// `upstream "name" { targets { ... } <options> }`, each target with its
/// weight.
fn upstream_weighted(name: &str, targets: &[(String, u32)], options: &str) -> String {
    let targets: String = targets
        .iter()
        .map(|(address, weight)| {
            format!("            target {{ address \"{address}\"; weight {weight} }}\n")
        })
        .collect();
    format!(
        "    upstream \"{name}\" {{\n        targets {{\n{targets}        }}\n        {options}\n    }}\n"
    )
}

/// `upstream "name"` over `targets` (addresses), weight 1 each.
fn upstream(name: &str, targets: &[String], options: &str) -> String {
    let weighted: Vec<(String, u32)> = targets.iter().map(|t| (t.clone(), 1)).collect();
    upstream_weighted(name, &weighted, options)
}

/// The addresses of test upstreams, as targets.
fn targets(upstreams: &[&Upstream]) -> Vec<String> {
    upstreams.iter().map(|u| u.target()).collect()
}

/// The `listeners`, `routes` and `upstreams` blocks (those not empty),
/// then `more`.
fn blocks(listeners: &[String], routes: &[String], upstreams: &[String], more: &str) -> String {
    let mut out = String::new();
    for (block, nodes) in [
        ("listeners", listeners),
        ("routes", routes),
        ("upstreams", upstreams),
    ] {
        if !nodes.is_empty() {
            out.push_str(&format!("{block} {{\n{}}}\n", nodes.concat()));
        }
    }
    out.push_str(more);
    out
}

/// A daemon with `blocks` in its configuration.
fn start(blocks: &str) -> Daemon {
    Daemon::start(DaemonConfig::default().with_blocks(blocks))
}

/// The common setup: one upstream, `app`, behind one plain listener,
/// `http`, by one route, with `more` blocks beside them.
async fn app_behind(more: &str) -> (Upstream, Daemon) {
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[route("all", r#"upstream "app""#)],
        &[upstream("app", &targets(&[&app]), "")],
        more,
    ));
    (app, daemon)
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`: peak resident memory).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}"))
}

/// Waits up to `limit` for `done` to hold (checking every 50 ms), failing
/// the test with `what` and the daemon's log otherwise.
async fn eventually(daemon: &Daemon, limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}; daemon log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a metric series now, 0 when absent.
fn metric(daemon: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    daemon.metric_value(name, labels).unwrap_or(0.0)
}
