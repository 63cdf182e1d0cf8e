//! An agent's `watch` push, end to end: the real daemon runs inside a test
//! network namespace with a steering rule and a quarantine listener, a
//! script agent (in the test process, reached over its Unix socket) answers
//! a request with a kernel push of action `watch`, and the pushing
//! client's next connections land on the quarantine listener while other
//! clients' do not. The guards of `kernel-push` apply to `watch` as to
//! `deny`: a refused push is counted and steers nothing.
//!
//! Which listener took a connection is what the user sees: the agent
//! answers requests that came through the quarantine listener with 451
//! (`metadata.listener`), the others with 200.
//!
//! Needs root (BPF, network namespaces); without it every test says
//! `SKIPPED` and returns.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use sentinel_agent_protocol::{AgentResponse, Decision, Event, KernelAction, KernelPush};
use sentinel_tests::{
    self as support,
    agent::{Handler, Reply, ScriptAgent, decide, on_events},
    client::get_from,
    daemon::{Daemon, DaemonConfig},
    netns::NetNs,
};

macro_rules! skip_unless_root {
    () => {
        if support::skip_unless_root("needs root (BPF, network namespaces)") {
            return;
        }
    };
}

/// Sources on the namespace's loopback (127/8 is all local there).
const SUSPECT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Ports the steering rule names; nothing is bound on them.
const RANGE: (u16, u16) = (21000, 21009);

/// What the quarantine listener's requests get from the agent.
const QUARANTINED: u16 = 451;

/// The push `path` asks for, if any.
fn push_for(path: &str) -> Option<KernelPush> {
    let watch = |prefix: Option<&str>| KernelPush {
        action: KernelAction::Watch,
        prefix: prefix.map(str::to_owned),
        ttl_seconds: Some(60),
        reason: Some("scanner".into()),
    };
    match path {
        // The client's own /32.
        "/attack" | "/rogue" => Some(watch(None)),
        // Wider than the agent's `min-prefix-length-v4 32` allows.
        "/wide" => Some(watch(Some("127.0.0.2/31"))),
        _ => None,
    }
}

/// Blocks what `push_for` names (403, with the push); answers the
/// quarantine listener's other requests with [`QUARANTINED`], the rest
/// with allow.
fn watcher() -> Handler {
    on_events(|r| {
        let Event::RequestHeaders(h) = &r.event else {
            return decide(Decision::Allow);
        };
        if let Some(push) = push_for(&h.uri) {
            return Reply::Answer(AgentResponse {
                decision: Decision::block(403),
                kernel_push: Some(push),
                ..AgentResponse::allow()
            });
        }
        if h.metadata.listener.as_deref() == Some("suspect") {
            return decide(Decision::block(QUARANTINED));
        }
        decide(Decision::Allow)
    })
}

/// `quarantine`: whether listener "suspect" is the quarantine one.
/// Route "rogue" goes through agent "rogue", which has no `kernel-push`
/// block; everything else through "waf".
fn blocks(waf: &ScriptAgent, rogue: &ScriptAgent, quarantine: bool) -> String {
    let flag = if quarantine { " quarantine;" } else { "" };
    format!(
        r#"
system {{ worker-threads 1; }}
listeners {{
    listener "main" {{ address "127.0.0.1:0"; }}
    listener "suspect" {{ address "127.0.0.1:0";{flag} }}
}}
routes {{
    route "rogue" {{
        matches {{ path-prefix "/rogue"; }}
        static-response 200 "ok"
        filters "rogue"
    }}
    route "all" {{
        static-response 200 "ok"
        filters "waf"
    }}
}}
agents {{
    agent "waf" type="waf" {{
        unix-socket "{}"
        events "request_headers"
        kernel-push {{
            max-ttl-seconds 600
            min-prefix-length-v4 32
        }}
    }}
    agent "rogue" type="waf" {{
        unix-socket "{}"
        events "request_headers"
    }}
}}
filters {{
    filter "waf" {{ type "agent"; agent "waf"; }}
    filter "rogue" {{ type "agent"; agent "rogue"; }}
}}
"#,
        waf.address, rogue.address
    )
}

struct Setup {
    daemon: Daemon,
    ns: NetNs,
    _agents: (ScriptAgent, ScriptAgent),
}

async fn setup(quarantine: bool) -> Setup {
    let waf = ScriptAgent::unix(true, watcher()).await;
    let rogue = ScriptAgent::unix(true, watcher()).await;
    let ns = NetNs::new();
    let daemon = Daemon::start(
        DaemonConfig::default()
            .with_blocks(&blocks(&waf, &rogue, quarantine))
            .with_kernel(&format!(
                "    steering {{\n        rule listener=\"main\" prefix=\"127.0.0.0/8\" ports=\"{}-{}\"\n    }}",
                RANGE.0, RANGE.1
            ))
            .in_netns(ns.path()),
    );
    Setup {
        daemon,
        ns,
        _agents: (waf, rogue),
    }
}

impl Setup {
    /// The status of `GET path` from `from` to `to`, or a panic with the
    /// daemon's log.
    fn status(&self, from: Ipv4Addr, to: SocketAddr, path: &str) -> u16 {
        let outcome = get_from(&self.ns, IpAddr::V4(from), to, path);
        outcome.status().unwrap_or_else(|| {
            panic!(
                "GET {path} from {from} to {to}: {outcome:?}; log:\n{}",
                self.daemon.log()
            )
        })
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.ns
            .run(|| self.daemon.metric_value(name, labels))
            .unwrap_or(0.0)
    }

    fn pushes(&self, agent: &str, result: &str) -> f64 {
        self.metric(
            "sentinel_kernel_push_total",
            &[("agent", agent), ("result", result)],
        )
    }

    fn steered(&self, listener: &str, reason: &str) -> f64 {
        self.metric(
            "sentinel_steering_total",
            &[("listener", listener), ("reason", reason)],
        )
    }

    fn watch_list(&self) -> Vec<serde_json::Value> {
        match self.daemon.cli_json(&["watch", "list", "--json"]) {
            serde_json::Value::Array(entries) => entries,
            other => panic!("`watch list --json` is not an array: {other}"),
        }
    }
}

fn steered_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], RANGE.0 + 3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_watch_push_quarantines_the_clients_next_connections() {
    skip_unless_root!();
    let s = setup(true).await;
    let main = s.daemon.listener("main");
    let steered = steered_port();

    // Before the push both sources are ordinary clients.
    assert_eq!(s.status(SUSPECT, steered, "/"), 200);
    assert_eq!(s.status(CLIENT, steered, "/"), 200);
    assert_eq!(s.steered("main", "rule"), 2.0);

    // The agent blocks this request and asks for its source to be watched.
    assert_eq!(s.status(SUSPECT, steered, "/attack"), 403);
    assert_eq!(s.pushes("waf", "applied"), 1.0);
    let listed = s.watch_list();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let entry = &listed[0];
    assert_eq!(entry["prefix"], "127.0.0.2/32");
    assert_eq!(entry["source"], "agent:waf");
    assert_eq!(entry["reason"], "scanner");
    assert_eq!(entry["hits"], 0);
    let ttl = entry["ttl_remaining_seconds"].as_f64().unwrap_or(0.0);
    assert!(ttl > 0.0 && ttl <= 60.0, "ttl {ttl}: {entry}");
    // A watch push is not a deny: the source is not dropped.
    assert!(
        s.daemon.deny_list().is_empty(),
        "{:?}",
        s.daemon.deny_list()
    );

    // Its next connections, through a steered address or straight to the
    // main listener, land on the quarantine listener; the other client's
    // do not.
    for to in [steered, main] {
        assert_eq!(s.status(SUSPECT, to, "/"), QUARANTINED, "suspect to {to}");
        assert_eq!(s.status(CLIENT, to, "/"), 200, "client to {to}");
    }
    assert_eq!(s.steered("suspect", "watchlist"), 2.0);
    // Two before the push, the push's own request, the client's two.
    assert_eq!(s.steered("main", "rule"), 5.0);
    let listed = s.watch_list();
    assert_eq!(listed[0]["hits"], 2, "{listed:?}");
    assert!(
        listed[0]["last_hit"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{listed:?}"
    );
    // The table the operator reads shows the same.
    let table = s.daemon.cli_ok(&["watch", "list"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("127.0.0.2/32"))
        .unwrap_or_else(|| panic!("no row for 127.0.0.2/32:\n{table}"));
    // PREFIX SOURCE REASON TTL HITS LAST-HIT
    let words: Vec<&str> = row.split_whitespace().collect();
    let n = words.len();
    assert!(
        n >= 6 && words[1] == "agent:waf" && words[2] == "scanner" && words[n - 2] == "2",
        "{table}"
    );
    assert_ne!(words[n - 1], "-", "a last hit is shown: {table}");

    // An operator's removal ends the quarantine at once.
    s.daemon.cli_ok(&["watch", "remove", "127.0.0.2/32"]);
    assert_eq!(s.status(SUSPECT, steered, "/"), 200);
    assert_eq!(s.steered("suspect", "watchlist"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_pushes_the_guards_refuse_steer_nothing() {
    skip_unless_root!();
    let s = setup(true).await;
    let steered = steered_port();

    // Wider than `min-prefix-length-v4 32`.
    assert_eq!(s.status(SUSPECT, steered, "/wide"), 403);
    assert_eq!(s.pushes("waf", "refused_prefix"), 1.0);
    // From an agent whose configuration has no `kernel-push` block.
    assert_eq!(s.status(SUSPECT, steered, "/rogue"), 403);
    assert_eq!(s.pushes("rogue", "refused_not_allowed"), 1.0);
    assert_eq!(s.pushes("waf", "applied"), 0.0);
    assert_eq!(s.pushes("rogue", "applied"), 0.0);

    assert!(s.watch_list().is_empty(), "{:?}", s.watch_list());
    assert_eq!(s.status(SUSPECT, steered, "/"), 200);
    assert_eq!(s.steered("suspect", "watchlist"), 0.0);
    assert_eq!(s.steered("main", "rule"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quarantine_listener_a_watch_push_is_unsupported() {
    skip_unless_root!();
    let s = setup(false).await;
    let steered = steered_port();
    assert_eq!(s.status(SUSPECT, steered, "/attack"), 403);
    assert_eq!(s.pushes("waf", "unsupported"), 1.0);
    assert!(s.watch_list().is_empty(), "{:?}", s.watch_list());
    assert_eq!(s.status(SUSPECT, steered, "/"), 200);
    assert_eq!(s.steered("main", "rule"), 2.0);
}
