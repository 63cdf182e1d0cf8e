//! Agents that fail: each fault gives the configured failure mode, the
//! proxy stays up, and nothing leaks.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use sentinel_agent_protocol::{AgentResponse, Decision, Event, EventType};
use sentinel_tests::{
    agent::{Reply, ScriptAgent, decide, on_events},
    http::{Upstream, get},
};

use super::*;

/// A daemon whose route goes through agent `a` with `options`, failing
/// `mode`.
fn through(app: &Upstream, a: &ScriptAgent, mode: &str, options: &str) -> Daemon {
    daemon(
        app,
        &["f"],
        &[agent(
            "a",
            "waf",
            &unix(a),
            &format!(
                "events \"request_headers\"\n        failure-mode \"{mode}\"\n        {options}"
            ),
        )],
        &[filter("f", "a", "")],
        "",
    )
}

/// Each fault in both failure modes: `open` lets the request through,
/// `closed` answers 503; the proxy keeps serving after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_takes_the_failure_mode() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let faults = [
        "garbage frame",
        "oversized frame",
        "wrong version",
        "closed mid-request",
        "bad decision",
    ];
    for mode in ["open", "closed"] {
        for name in faults {
            let reply_of = {
                let name = name.to_string();
                move || {
                    match name.as_str() {
                    "garbage frame" => Reply::Frame(b"{not json".to_vec()),
                    "oversized frame" => {
                        Reply::Bytes((11u32 * 1024 * 1024).to_be_bytes().to_vec())
                    }
                    "wrong version" => {
                        Reply::Frame(br#"{"version": 2, "decision": "allow"}"#.to_vec())
                    }
                    "closed mid-request" => Reply::Close,
                    _ => Reply::Frame(
                        br#"{"version": 1, "decision": {"redirect": {"url": "/x", "status": 200}}}"#
                            .to_vec(),
                    ),
                }
                }
            };
            let a = ScriptAgent::unix(false, on_events(move |_| reply_of())).await;
            let d = through(&app, &a, mode, "timeout-ms 2000");
            let addr = d.listener("http");
            let started = Instant::now();
            let r = get(addr, "/x").await;
            let want = if mode == "open" {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            assert_eq!(r.status, want, "{name}, failure-mode {mode}: {}", d.log());
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "{name}: a fault must not wait for the timeout"
            );
            // Still serving, and the agent is called again (a fresh
            // connection after a broken one).
            a.set(on_events(|_| decide(Decision::Allow)));
            let r = get(addr, "/y").await;
            assert_eq!(r.status, StatusCode::OK, "{name}: after the fault");
            assert_eq!(
                metric(
                    &d,
                    "sentinel_agent_requests_total",
                    &[("agent", "a"), ("status", "error")]
                ),
                1.0,
                "{name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_is_not_running() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    for (mode, want) in [
        ("open", StatusCode::OK),
        ("closed", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let a = ScriptAgent::unix(true, on_events(|_| decide(Decision::Allow))).await;
        let d = through(&app, &a, mode, "");
        // The process dies; its socket file stays, as a killed one leaves
        // it.
        a.kill();
        let r = get(d.listener("http"), "/").await;
        assert_eq!(r.status, want, "failure-mode {mode}");
        assert_eq!(
            metric(
                &d,
                "sentinel_agent_errors_total",
                &[("agent", "a"), ("error", "connect")]
            ),
            1.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_agent_times_out_on_time() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let a = ScriptAgent::unix(true, on_events(|_| Reply::Hang)).await;
    let d = through(&app, &a, "closed", "timeout-ms 300");
    let addr = d.listener("http");
    // Once to connect and configure, then measured.
    let _ = get(addr, "/warm").await;
    for _ in 0..3 {
        let started = Instant::now();
        let r = get(addr, "/").await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        // Never before the timeout; and the timeout, not a hang or some
        // longer default, ends it. The upper bound leaves room for a
        // loaded machine: it tells 300 ms from seconds, not from 350 ms.
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
            "a 300 ms timeout held for {took:?}"
        );
    }
    assert_eq!(
        metric(&d, "sentinel_agent_timeouts_total", &[("agent", "a")]),
        4.0
    );
    // A filter's own timeout and failure mode win over the agent's.
    let d = daemon(
        &app,
        &["f"],
        &[agent(
            "a",
            "waf",
            &unix(&a),
            "events \"request_headers\"\n        failure-mode \"closed\"\n        timeout-ms 5000",
        )],
        &[filter(
            "f",
            "a",
            "timeout-ms 100\n        failure-mode \"open\"",
        )],
        "",
    );
    let started = Instant::now();
    let r = get(d.listener("http"), "/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_millis(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_at_its_threshold_and_half_opens_after_its_timeout() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let a = ScriptAgent::unix(true, on_events(|_| Reply::Frame(b"garbage".to_vec()))).await;
    let d = through(
        &app,
        &a,
        "closed",
        "circuit-breaker {\n            failure-threshold 3\n            success-threshold 2\n            timeout-seconds 1\n        }",
    );
    let addr = d.listener("http");
    let calls = || a.events(EventType::RequestHeaders).len();
    for _ in 0..3 {
        assert_eq!(get(addr, "/").await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(calls(), 3);
    assert_eq!(
        metric(
            &d,
            "sentinel_agent_circuit_breaker_state",
            &[("agent", "a")]
        ),
        1.0,
        "open after 3 failures"
    );
    // Open: the agent is not called at all.
    assert_eq!(get(addr, "/").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls(), 3);
    assert_eq!(
        metric(
            &d,
            "sentinel_agent_requests_total",
            &[("agent", "a"), ("status", "circuit_open")]
        ),
        1.0
    );
    // After the timeout: half-open, one trial; the agent has recovered.
    a.set(on_events(|_| decide(Decision::Allow)));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    assert_eq!(
        metric(
            &d,
            "sentinel_agent_circuit_breaker_state",
            &[("agent", "a")]
        ),
        2.0,
        "half-open until the second success"
    );
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    assert_eq!(
        metric(
            &d,
            "sentinel_agent_circuit_breaker_state",
            &[("agent", "a")]
        ),
        0.0,
        "closed again"
    );
}

fn open_fds(d: &Daemon) -> usize {
    let pid = d
        .pid()
        .unwrap_or_else(|| panic!("the daemon is not running"));
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or_else(|e| panic!("cannot list the daemon's descriptors: {e}"))
}

/// Faults over and over leak nothing: the daemon's descriptors come back
/// to where they were (broken connections are closed, not kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_faults_leak_no_descriptors() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let n = Arc::new(AtomicU64::new(0));
    let counter = n.clone();
    // Rotates through every fault, one per call.
    let a = ScriptAgent::unix(
        false,
        on_events(move |_| match counter.fetch_add(1, Ordering::Relaxed) % 4 {
            0 => Reply::Frame(b"{not json".to_vec()),
            1 => Reply::Bytes((11u32 * 1024 * 1024).to_be_bytes().to_vec()),
            2 => Reply::Close,
            _ => Reply::Hang,
        }),
    )
    .await;
    let d = through(
        &app,
        &a,
        "open",
        "timeout-ms 100
        circuit-breaker { failure-threshold 10000; }",
    );
    let addr = d.listener("http");
    for _ in 0..8 {
        assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    }
    let before = open_fds(&d);
    for _ in 0..200 {
        assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    }
    // Client connections close as their requests end; give the last ones
    // a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = open_fds(&d);
    assert!(
        after <= before + 4,
        "descriptors grew from {before} to {after} over 200 faulty calls"
    );
    assert!(n.load(Ordering::Relaxed) >= 200);
}

/// A thousand requests at once through one agent: one Unix connection,
/// many calls in flight on it, every answer matched to its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_share_one_connection() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    // Each answer names the request it is for, and takes a little while,
    // so answers come back out of order.
    let n = Arc::new(AtomicU64::new(0));
    let counter = n.clone();
    let a = ScriptAgent::unix(
        true,
        on_events(move |r| {
            let Event::RequestHeaders(h) = &r.event else {
                return Reply::Answer(AgentResponse::allow());
            };
            let k = counter.fetch_add(1, Ordering::Relaxed);
            Reply::After(
                Duration::from_millis(k % 7 * 3),
                AgentResponse {
                    response_headers: vec![sentinel_agent_protocol::HeaderOp::Set {
                        name: "x-for".into(),
                        value: h.uri.clone(),
                    }],
                    ..AgentResponse::allow()
                },
            )
        }),
    )
    .await;
    let d = daemon(
        &app,
        &["f"],
        &[agent(
            "a",
            "waf",
            &unix(&a),
            "events \"request_headers\"\n        timeout-ms 20000\n        max-concurrent-calls 2000",
        )],
        &[filter("f", "a", "")],
        "system {\n    max-connections 5000\n}\n",
    );
    let addr = d.listener("http");
    let mut tasks = Vec::new();
    for i in 0..1000 {
        tasks.push(tokio::spawn(async move {
            let path = format!("/r/{i}");
            let r = get(addr, &path).await;
            (path, r.status, r.header("x-for").map(str::to_owned))
        }));
    }
    for t in tasks {
        let (path, status, echoed) = t.await.unwrap_or_else(|e| panic!("client task: {e}"));
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(
            echoed.as_deref(),
            Some(path.as_str()),
            "answer matched to its request"
        );
    }
    assert_eq!(a.connections(), 1, "one connection to the agent");
    assert!(
        a.max_in_flight() > 10,
        "calls were in flight together ({} at most)",
        a.max_in_flight()
    );
    assert_eq!(n.load(Ordering::Relaxed), 1000);
}

/// An agent that does not accept multiplexing (written from the seed
/// alone) still works: one call at a time per connection, several
/// connections for concurrent requests, and it never sees an `id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_multiplexing_get_one_call_per_connection() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let a = ScriptAgent::unix(
        false,
        on_events(|_| Reply::After(Duration::from_millis(50), AgentResponse::allow())),
    )
    .await;
    let d = through(&app, &a, "closed", "");
    let addr = d.listener("http");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move { get(addr, "/").await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap_or_else(|e| panic!("{e}")), StatusCode::OK);
    }
    assert!(
        a.seen().iter().all(|r| r.id.is_none()),
        "no ids without the extension"
    );
    assert!(
        a.connections() > 1,
        "concurrent calls need several connections"
    );
    assert!(a.max_in_flight() > 1);
}
