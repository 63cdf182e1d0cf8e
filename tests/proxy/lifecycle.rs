//! The proxy across its life: SIGHUP reloads, SIGTERM drains, and what it
//! reports (metrics, access log) along the way.

use std::{fs, time::Duration};

use sentinel_tests::{
    daemon::{Daemon, DaemonConfig},
    http::{Raw, Upstream, body, empty, fetch, get, try_fetch},
};
use serde_json::Value;

use super::{
    app_behind, blocks, eventually, listener, metric, route, skip, start, targets, upstream,
};

/// Replaces `from` (which the daemon's configuration file must hold) with
/// `to` in that file, then asks the daemon to reload it.
fn reload_with(daemon: &Daemon, from: &str, to: &str) {
    let current = fs::read_to_string(&daemon.config_path)
        .unwrap_or_else(|e| panic!("cannot read the configuration: {e}"));
    assert!(current.contains(from), "the configuration has no {from:?}");
    fs::write(&daemon.config_path, current.replace(from, to))
        .unwrap_or_else(|e| panic!("cannot write the configuration: {e}"));
    daemon.signal(libc::SIGHUP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_routes_and_listeners_without_dropping_requests() {
    if skip() {
        return;
    }
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    let config = |route_to: &str, listeners: &[String]| {
        blocks(
            listeners,
            &[route("app", &format!("upstream \"{route_to}\""))],
            &[
                upstream("old", &targets(&[&old]), ""),
                upstream("new", &targets(&[&new]), ""),
            ],
            "",
        )
    };
    let daemon = start(&config(
        "old",
        &[listener("main", ""), listener("second", "")],
    ));
    let main = daemon.listener("main");
    let second = daemon.listener("second");
    assert_eq!(get(second, "/x").await.upstream(), "old");

    // A slow request to the old upstream is in flight during the reload.
    let slow = tokio::spawn(async move { get(main, "/slow?sleep_ms=2000").await });
    eventually(
        &daemon,
        Duration::from_secs(5),
        "the slow request to arrive",
        || old.in_flight() == 1,
    )
    .await;
    let blocks_before = config("old", &[listener("main", ""), listener("second", "")]);
    let blocks_after = config("new", &[listener("main", ""), listener("third", "")]);
    reload_with(&daemon, &blocks_before, &blocks_after);
    eventually(&daemon, Duration::from_secs(10), "the new listener", || {
        daemon.listeners().iter().any(|(n, _)| n == "third")
    })
    .await;
    assert_eq!(get(main, "/x").await.upstream(), "new");
    let third = daemon.listener("third");
    assert_eq!(get(third, "/x").await.upstream(), "new");
    assert!(
        try_fetch(second, "GET", "/x", &[], empty()).await.is_err(),
        "the removed listener still answers"
    );
    let slow = slow
        .await
        .unwrap_or_else(|e| panic!("slow request task: {e}"));
    assert_eq!((slow.status.as_u16(), slow.upstream()), (200, "old"));

    // An invalid file: logged with its reason, nothing changes.
    reload_with(&daemon, "upstream \"new\"\n", "upstream \"missing\"\n");
    assert!(fs::read_to_string(&daemon.config_path).is_ok_and(|t| t.contains("\"missing\"")));
    eventually(
        &daemon,
        Duration::from_secs(10),
        "the refusal to be logged",
        || daemon.log().contains("configuration not reloaded"),
    )
    .await;
    let log = daemon.log();
    assert!(
        log.contains("route 'app': upstream 'missing' is not defined"),
        "the log does not say why:\n{log}"
    );
    assert_eq!(get(main, "/x").await.upstream(), "new");
    assert_eq!(get(third, "/x").await.upstream(), "new");
}

/// With `worker-threads 1` the daemon runs on one thread (tokio's
/// current-thread runtime, its kernel work done in place): it proxies,
/// reloads and drains there as it does on several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_thread_proxies_reloads_and_drains() {
    if skip() {
        return;
    }
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    let config = |route_to: &str| {
        blocks(
            &[listener("main", "")],
            &[route("app", &format!("upstream \"{route_to}\""))],
            &[
                upstream("old", &targets(&[&old]), ""),
                upstream("new", &targets(&[&new]), ""),
            ],
            "system { worker-threads 1; graceful-shutdown-timeout-secs 10; }\n",
        )
    };
    let mut daemon = start(&config("old"));
    let main = daemon.listener("main");
    assert_eq!(get(main, "/x").await.upstream(), "old");

    reload_with(&daemon, &config("old"), &config("new"));
    let mut switched = false;
    for _ in 0..100 {
        if get(main, "/x").await.upstream() == "new" {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        switched,
        "the reload did not apply; daemon log:\n{}",
        daemon.log()
    );

    let slow = tokio::spawn(async move { get(main, "/slow?sleep_ms=1000").await });
    eventually(
        &daemon,
        Duration::from_secs(5),
        "the slow request to arrive",
        || new.in_flight() == 1,
    )
    .await;
    daemon.signal(libc::SIGTERM);
    let slow = slow
        .await
        .unwrap_or_else(|e| panic!("slow request task: {e}"));
    assert_eq!((slow.status.as_u16(), slow.upstream()), (200, "new"));
    let status = daemon.wait_exit(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "the daemon exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    if skip() {
        return;
    }
    let (app, mut daemon) = app_behind("system { graceful-shutdown-timeout-secs 10; }\n").await;
    let addr = daemon.listener("http");
    // An idle keep-alive connection, which the drain closes at once.
    let mut idle = Raw::connect(addr).await;
    idle.send(b"GET /idle HTTP/1.1\r\nHost: test.local\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = idle.response(Duration::from_secs(10)).await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    let slow = tokio::spawn(async move {
        let started = std::time::Instant::now();
        (get(addr, "/slow?sleep_ms=2000").await, started)
    });
    eventually(
        &daemon,
        Duration::from_secs(5),
        "the slow request to arrive",
        || app.in_flight() == 1,
    )
    .await;
    let signalled = std::time::Instant::now();
    daemon.signal(libc::SIGTERM);
    assert!(
        idle.closed_within(Duration::from_secs(1)).await.is_some(),
        "an idle connection stayed open after SIGTERM"
    );
    // New connections are refused soon after the signal, while the slow
    // request is still in flight.
    let mut refused = false;
    for _ in 0..20 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "new connections are still accepted 1 s after SIGTERM"
    );
    assert_eq!(app.in_flight(), 1, "the slow request ended early");
    let (reply, started) = slow
        .await
        .unwrap_or_else(|e| panic!("slow request task: {e}"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(started.elapsed() >= Duration::from_millis(1900));
    let status = daemon.wait_exit(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "the daemon exited with {status}");
    // Once the last request is done, not at the 10 s deadline.
    assert!(
        signalled.elapsed() < Duration::from_secs(6),
        "the daemon took {:?} to exit",
        signalled.elapsed()
    );
}

fn access_lines(daemon: &Daemon) -> Vec<Value> {
    daemon
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["target"] == "sentinel::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_json_access_log() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let daemon = Daemon::start(
        DaemonConfig::default()
            .with_observability(r#"    logging { access-log #true; format "json"; }"#)
            .with_blocks(&blocks(
                &[listener("http", "")],
                &[route(
                    "api",
                    r#"matches { path-prefix "/api/"; }; upstream "backend""#,
                )],
                &[upstream("backend", &targets(&[&app]), "")],
                "",
            )),
    );
    let addr = daemon.listener("http");

    let mut ids = Vec::new();
    for _ in 0..3 {
        let reply = get(addr, "/api/get").await;
        assert_eq!(reply.status, 200);
        ids.push(reply.header("x-request-id").unwrap_or("").to_owned());
    }
    let reply = fetch(
        addr,
        "POST",
        "/api/post",
        &[("x-request-id", "post-1")],
        body("abc"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(get(addr, "/elsewhere").await.status, 404);

    let text = daemon.metrics();
    let value = |name: &str, labels: &[(&str, &str)]| {
        sentinel_tests::daemon::parse_metric(&text, name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in /metrics:\n{text}"))
    };
    let requests = "sentinel_requests_total";
    assert_eq!(
        value(
            requests,
            &[("route", "api"), ("method", "GET"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        value(
            requests,
            &[("route", "api"), ("method", "POST"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        value(
            requests,
            &[("route", "none"), ("method", "GET"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "sentinel_request_duration_seconds_count",
            &[("route", "api")]
        ),
        4.0
    );
    assert_eq!(
        value(
            "sentinel_request_duration_seconds_count",
            &[("route", "none")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "sentinel_upstream_requests_total",
            &[("upstream", "backend"), ("result", "2xx")]
        ),
        4.0
    );
    assert_eq!(
        value(
            "sentinel_upstream_health",
            &[("upstream", "backend"), ("target", &app.target())]
        ),
        1.0
    );

    // A connection held open counts; closed, it no longer does.
    let connections =
        |d: &Daemon| metric(d, "sentinel_active_connections", &[("listener", "http")]);
    eventually(
        &daemon,
        Duration::from_secs(5),
        "no open connection",
        || connections(&daemon) == 0.0,
    )
    .await;
    let mut held = Raw::connect(addr).await;
    let held_status = async |held: &mut Raw| {
        held.send(b"GET /api/held HTTP/1.1\r\nHost: test.local\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        held.response(Duration::from_secs(10))
            .await
            .map(|r| r.status)
    };
    assert_eq!(held_status(&mut held).await, Some(200));
    assert_eq!(connections(&daemon), 1.0);
    // Idle, it parks (after 20 ms) and counts as idle too; served again,
    // it no longer does until it parks again.
    let idle = |d: &Daemon| metric(d, "sentinel_idle_connections", &[("listener", "http")]);
    eventually(
        &daemon,
        Duration::from_secs(5),
        "the held connection to park",
        || idle(&daemon) == 1.0,
    )
    .await;
    assert_eq!(
        held_status(&mut held).await,
        Some(200),
        "a parked connection was not served again"
    );
    assert_eq!(connections(&daemon), 1.0);
    eventually(
        &daemon,
        Duration::from_secs(5),
        "the held connection to park again",
        || idle(&daemon) == 1.0,
    )
    .await;
    drop(held);
    eventually(
        &daemon,
        Duration::from_secs(5),
        "the held connection to close",
        || connections(&daemon) == 0.0 && idle(&daemon) == 0.0,
    )
    .await;

    // One JSON access log line per request, in order.
    let lines = access_lines(&daemon);
    let summary: Vec<(String, String, u64, String)> = lines
        .iter()
        .map(|l| {
            (
                l["method"].as_str().unwrap_or("?").to_owned(),
                l["path"].as_str().unwrap_or("?").to_owned(),
                l["status"].as_u64().unwrap_or(0),
                l["route"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, u64, String)> = [
        ("GET", "/api/get", 200, "api"),
        ("GET", "/api/get", 200, "api"),
        ("GET", "/api/get", 200, "api"),
        ("POST", "/api/post", 200, "api"),
        ("GET", "/elsewhere", 404, "none"),
        ("GET", "/api/held", 200, "api"),
        ("GET", "/api/held", 200, "api"),
    ]
    .iter()
    .map(|(m, p, s, r)| ((*m).to_owned(), (*p).to_owned(), *s, (*r).to_owned()))
    .collect();
    assert_eq!(summary, expected, "access log:\n{lines:#?}");
    let logged_ids: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(&logged_ids[..3], &ids[..]);
    assert_eq!(logged_ids[3], "post-1");
    assert_eq!(lines[0]["upstream"], "backend");
    assert_eq!(lines[0]["upstream_target"], app.target());
}

/// A client that goes away while its request waits on the upstream has
/// that request cancelled, its upstream connection closed, rather than
/// left running to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_request_cancels_the_upstream_request() {
    if skip() {
        return;
    }
    let (app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");
    for how in ["close", "half-close"] {
        let mut client = Raw::connect(addr).await;
        client
            .send(b"GET /slow?sleep_ms=10000 HTTP/1.1\r\nHost: test.local\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        eventually(
            &daemon,
            Duration::from_secs(5),
            "the slow request to arrive",
            || app.in_flight() == 1,
        )
        .await;
        if how == "close" {
            drop(client);
        } else {
            client.shut_write().await;
        }
        eventually(
            &daemon,
            Duration::from_secs(3),
            &format!("the upstream request to end after the client's {how}"),
            || app.in_flight() == 0,
        )
        .await;
    }
    // The proxy goes on serving.
    assert_eq!(get(addr, "/x").await.status, 200);
}
