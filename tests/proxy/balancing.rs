//! Choosing a target: round robin with weights, least connections; taking
//! targets out (active checks, passive ejection) and what a client sees
//! when targets fail: 502, 503, 504, retries.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use sentinel_tests::http::{Upstream, body, closed_port, fetch, get};

use super::{
    blocks, eventually, listener, metric, route, skip, start, targets, upstream, upstream_weighted,
};

/// How many of `n` GETs of `path` each upstream answered.
async fn spread(addr: SocketAddr, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        *counts.entry(reply.upstream().to_owned()).or_default() += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_weights_and_least_connections() {
    if skip() {
        return;
    }
    let rr = [
        Upstream::start("rr1").await,
        Upstream::start("rr2").await,
        Upstream::start("rr3").await,
    ];
    let light = Upstream::start("light").await;
    let heavy = Upstream::start("heavy").await;
    let lc = [Upstream::start("lc1").await, Upstream::start("lc2").await];
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[
            route("rr", r#"matches { path-prefix "/rr/"; }; upstream "rr""#),
            route(
                "weighted",
                r#"matches { path-prefix "/weighted/"; }; upstream "weighted""#,
            ),
            route(
                "least",
                r#"matches { path-prefix "/least/"; }; upstream "least""#,
            ),
        ],
        &[
            upstream("rr", &targets(&[&rr[0], &rr[1], &rr[2]]), ""),
            upstream_weighted("weighted", &[(light.target(), 1), (heavy.target(), 3)], ""),
            upstream(
                "least",
                &targets(&[&lc[0], &lc[1]]),
                r#"load-balancing "least_connections""#,
            ),
        ],
        "",
    ));
    let addr = daemon.listener("http");

    assert_eq!(
        spread(addr, "/rr/x", 30).await,
        counts(&[("rr1", 10), ("rr2", 10), ("rr3", 10)])
    );
    assert_eq!(
        spread(addr, "/weighted/x", 40).await,
        counts(&[("heavy", 30), ("light", 10)])
    );

    // One target holds a slow request: the others go to the idle one.
    let slow = tokio::spawn(async move { get(addr, "/least/slow?sleep_ms=1500").await });
    eventually(
        &daemon,
        Duration::from_secs(5),
        "the slow request to arrive",
        || lc[0].in_flight() + lc[1].in_flight() == 1,
    )
    .await;
    let (busy, idle) = if lc[0].in_flight() == 1 {
        ("lc1", "lc2")
    } else {
        ("lc2", "lc1")
    };
    assert_eq!(spread(addr, "/least/quick", 6).await, counts(&[(idle, 6)]));
    let slow = slow
        .await
        .unwrap_or_else(|e| panic!("slow request task: {e}"));
    assert_eq!((slow.status.as_u16(), slow.upstream()), (200, busy));
    // Both idle again (the proxy counts the slow request until it has
    // polled its body's end, just after the client read it): they share.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        spread(addr, "/least/quick", 4).await,
        counts(&[("lc1", 2), ("lc2", 2)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_target_out_and_back() {
    if skip() {
        return;
    }
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let check = r#"health-check { path "/health"; interval-secs 1; timeout-ms 500; healthy-threshold 2; unhealthy-threshold 2; }"#;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[route("all", r#"upstream "app""#)],
        &[upstream("app", &targets(&[&a, &b]), check)],
        "",
    ));
    let addr = daemon.listener("http");
    let health = |u: &Upstream| {
        metric(
            &daemon,
            "sentinel_upstream_health",
            &[("upstream", "app"), ("target", &u.target())],
        )
    };
    assert_eq!((health(&a), health(&b)), (1.0, 1.0));
    eventually(
        &daemon,
        Duration::from_secs(5),
        "a first health check",
        || b.health_checks() >= 1,
    )
    .await;
    assert_eq!(spread(addr, "/x", 4).await, counts(&[("a", 2), ("b", 2)]));

    // Counted before the switch: every check that fails comes after.
    let checks = b.health_checks();
    b.set_health(500);
    eventually(&daemon, Duration::from_secs(8), "b to be taken out", || {
        health(&b) == 0.0
    })
    .await;
    assert!(
        b.health_checks() >= checks + 2,
        "b was taken out after fewer than 2 failed checks"
    );
    assert_eq!(health(&a), 1.0);
    let before = b.heads();
    assert_eq!(spread(addr, "/x", 6).await, counts(&[("a", 6)]));
    assert_eq!(b.heads(), before, "an unhealthy target got requests");

    b.set_health(200);
    eventually(&daemon, Duration::from_secs(8), "b to come back", || {
        health(&b) == 1.0
    })
    .await;
    assert_eq!(spread(addr, "/x", 4).await, counts(&[("a", 2), ("b", 2)]));

    // Every target out: 503, and nothing reaches them.
    a.set_health(500);
    b.set_health(500);
    eventually(
        &daemon,
        Duration::from_secs(8),
        "both to be taken out",
        || health(&a) == 0.0 && health(&b) == 0.0,
    )
    .await;
    let heads = a.heads() + b.heads();
    let reply = get(addr, "/x").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(a.heads() + b.heads(), heads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_refused_connections_and_no_target_left() {
    if skip() {
        return;
    }
    let a = Upstream::start("a").await;
    let dead = closed_port().to_string();
    let lone = closed_port().to_string();
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[
            route(
                "pair",
                r#"matches { path-prefix "/pair/"; }; upstream "pair""#,
            ),
            route(
                "lone",
                r#"matches { path-prefix "/lone/"; }; upstream "lone""#,
            ),
        ],
        &[
            upstream(
                "pair",
                &[a.target(), dead.clone()],
                "retries 0; passive-health { consecutive-failures 2; ejection-secs 60; }",
            ),
            upstream(
                "lone",
                std::slice::from_ref(&lone),
                "retries 0; passive-health { consecutive-failures 1; ejection-secs 60; }",
            ),
        ],
        "",
    ));
    let addr = daemon.listener("http");

    // Round robin alternates; each refused connection is a 502 until the
    // second one in a row ejects the target.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(addr, "/pair/x").await.status.as_u16());
    }
    assert_eq!(statuses, [200, 502, 200, 502]);
    let gauge = |upstream: &str, target: &str| {
        metric(
            &daemon,
            "sentinel_upstream_health",
            &[("upstream", upstream), ("target", target)],
        )
    };
    assert_eq!(gauge("pair", &dead), 0.0);
    assert_eq!(gauge("pair", &a.target()), 1.0);
    assert_eq!(spread(addr, "/pair/x", 6).await, counts(&[("a", 6)]));
    assert_eq!(
        metric(
            &daemon,
            "sentinel_upstream_requests_total",
            &[("upstream", "pair"), ("result", "connect_error")]
        ),
        2.0
    );

    // The only target refuses: 502; once it is ejected nothing is left:
    // 503.
    let first = get(addr, "/lone/x").await;
    assert_eq!(first.status, 502, "{}", first.text());
    assert_eq!(gauge("lone", &lone), 0.0);
    let second = get(addr, "/lone/x").await;
    assert_eq!(second.status, 503, "{}", second.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstreams_time_out_and_only_safe_requests_are_retried() {
    if skip() {
        return;
    }
    let slow = Upstream::start("slow").await;
    let a = Upstream::start("a").await;
    let dead = closed_port().to_string();
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[
            route(
                "slow",
                r#"matches { path-prefix "/slow/"; }; upstream "slow""#,
            ),
            route(
                "retry",
                r#"matches { path-prefix "/retry/"; }; upstream "retry""#,
            ),
        ],
        &[
            upstream(
                "slow",
                &targets(&[&slow]),
                "retries 0; timeouts { read-ms 300; }",
            ),
            upstream(
                "retry",
                &[dead, a.target()],
                "retries 1; passive-health { consecutive-failures 1000; }",
            ),
        ],
        "",
    ));
    let addr = daemon.listener("http");

    let started = std::time::Instant::now();
    let reply = get(addr, "/slow/x?sleep_ms=3000").await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "504 took {:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(
            &daemon,
            "sentinel_upstream_requests_total",
            &[("upstream", "slow"), ("result", "timeout")]
        ),
        1.0
    );

    // Round robin puts every GET on the dead target first; each is
    // retried on the live one.
    assert_eq!(spread(addr, "/retry/get", 3).await, counts(&[("a", 3)]));
    let attempts = |result: &str| {
        metric(
            &daemon,
            "sentinel_upstream_requests_total",
            &[("upstream", "retry"), ("result", result)],
        )
    };
    assert_eq!((attempts("connect_error"), attempts("2xx")), (3.0, 3.0));

    // A POST with a body is not: the one sent to the dead target fails.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let reply = fetch(addr, "POST", "/retry/post", &[], body("payload")).await;
        statuses.push(reply.status.as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 502]);
    let posts: Vec<u64> = a
        .seen()
        .iter()
        .filter(|s| s.method == "POST")
        .map(|s| s.body_bytes)
        .collect();
    assert_eq!(posts, [7]);
    assert_eq!(attempts("connect_error"), 4.0);
}
