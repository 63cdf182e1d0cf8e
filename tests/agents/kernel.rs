//! From an agent's verdict to the kernel, end to end: a client in a
//! network namespace is blocked by an agent that asks for a kernel push,
//! and its next SYN is dropped by XDP before it reaches the proxy.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use sentinel_agent_protocol::{AgentResponse, Decision, Event, KernelPush};
use sentinel_tests::{
    agent::{Reply, ScriptAgent, decide, on_events},
    daemon::{Daemon, DaemonConfig},
    http::Upstream,
    netns::{Attempt, NetNs},
};

use super::*;

/// Blocks `/attack` and asks for the client to be denied for a minute.
fn pusher() -> sentinel_tests::agent::Handler {
    on_events(|r| match &r.event {
        Event::RequestHeaders(h) if h.uri == "/attack" => Reply::Answer(AgentResponse {
            decision: Decision::block(403),
            kernel_push: Some(KernelPush {
                ttl_seconds: Some(60),
                reason: Some("sqli probe".into()),
                ..KernelPush::default()
            }),
            ..AgentResponse::allow()
        }),
        _ => decide(Decision::Allow),
    })
}

/// The status line's code of a `GET path` from inside `ns`.
fn get_status(ns: &NetNs, to: SocketAddr, path: &str) -> Option<u16> {
    let path = path.to_owned();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    })
}

fn setup(app: &Upstream, ns: &NetNs, a: &ScriptAgent, kernel: &str, more: &str) -> Daemon {
    let blocks = format!(
        "listeners {{\n    listener \"edge\" {{\n        address \"{}:0\"\n    }}\n}}\n\
         routes {{\n    route \"app\" {{\n        upstream \"app\"\n        filters \"waf\"\n    }}\n}}\n\
         upstreams {{\n    upstream \"app\" {{\n        targets {{\n            target {{ address \"{}\"; }}\n        }}\n    }}\n}}\n\
         agents {{\n{}}}\nfilters {{\n{}}}\n{more}",
        ns.host_v4,
        app.target(),
        agent(
            "waf",
            "waf",
            &unix(a),
            "events \"request_headers\"\n        kernel-push {\n            max-ttl-seconds 600\n        }",
        ),
        filter("waf", "waf", ""),
    );
    Daemon::start(
        DaemonConfig::attached(&ns.host_if, "native")
            .with_kernel(kernel)
            .with_blocks(&blocks),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_push_drops_the_clients_next_syn() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let ns = NetNs::new();
    let a = ScriptAgent::unix(true, pusher()).await;
    let d = setup(&app, &ns, &a, "", "");
    let edge = d.listener("edge");
    let client = format!("{}/32", ns.peer_v4);

    assert_eq!(get_status(&ns, edge, "/hello"), Some(200), "{}", d.log());
    // The agent blocks and pushes; the block still reaches the client.
    assert_eq!(get_status(&ns, edge, "/attack"), Some(403), "{}", d.log());
    let entries = d.deny_list();
    let entry = entries
        .iter()
        .find(|e| e["prefix"] == client.as_str())
        .unwrap_or_else(|| panic!("no entry for {client}: {entries:?}"));
    assert_eq!(entry["source"], "agent:waf");
    assert_eq!(entry["reason"], "sqli probe");
    let ttl = entry["ttl_remaining_seconds"].as_f64().unwrap_or(0.0);
    assert!(ttl > 50.0 && ttl <= 60.0, "ttl {ttl}");
    assert_eq!(
        metric(
            &d,
            "sentinel_kernel_push_total",
            &[("agent", "waf"), ("result", "applied")]
        ),
        1.0
    );

    // The next connection never gets an answer to its SYN, and XDP
    // counted the drops.
    assert_eq!(
        ns.tcp_exchange(edge, Duration::from_secs(2)),
        Attempt::TimedOut
    );
    let dropped = metric(
        &d,
        "sentinel_xdp_packets_total",
        &[
            ("interface", &ns.host_if),
            ("action", "drop"),
            ("reason", "denylist"),
        ],
    );
    assert!(dropped >= 1.0, "XDP drops: {dropped}");
    assert_eq!(
        d.metric_value(
            "sentinel_denylist_updates_total",
            &[("source", "agent"), ("result", "added")]
        ),
        Some(1.0)
    );

    // Removing the entry lets the client back in.
    d.cli_ok(&["deny", "remove", &client]);
    assert_eq!(get_status(&ns, edge, "/hello"), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_never_applied_for_allowlisted_clients_or_in_monitor_mode() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let ns = NetNs::new();
    let a = ScriptAgent::unix(true, pusher()).await;
    let allow = format!(
        "allowlist {{\n        prefix \"{}\" reason=\"office\"\n    }}",
        ns.v4_net
    );
    let d = setup(&app, &ns, &a, &allow, "");
    let edge = d.listener("edge");
    assert_eq!(get_status(&ns, edge, "/attack"), Some(403));
    assert!(d.deny_list().is_empty(), "{:?}", d.deny_list());
    assert_eq!(
        metric(
            &d,
            "sentinel_kernel_push_total",
            &[("agent", "waf"), ("result", "refused_allowlisted")]
        ),
        1.0
    );
    assert_eq!(get_status(&ns, edge, "/hello"), Some(200));
    drop(d);

    let ns = NetNs::new();
    let d = setup(&app, &ns, &a, "", "profile {\n    mode \"monitor\"\n}\n");
    let edge = d.listener("edge");
    assert_eq!(
        get_status(&ns, edge, "/attack"),
        Some(200),
        "monitor mode never blocks"
    );
    assert!(d.deny_list().is_empty());
    assert_eq!(
        metric(
            &d,
            "sentinel_kernel_push_total",
            &[("agent", "waf"), ("result", "would_apply")]
        ),
        1.0
    );
    assert_eq!(get_status(&ns, edge, "/hello"), Some(200));
}
