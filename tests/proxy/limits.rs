//! What a client may send and how long it may take: header and body
//! limits, slow and idle clients, connection caps; request smuggling.

use std::time::Duration;

use sentinel_tests::http::{Raw, Upstream, Zeros, body, exchange, fetch, get};

use super::{app_behind, blocks, listener, route, skip, start, targets, upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_bodies_are_refused() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[
            route(
                "small",
                r#"matches { path-prefix "/small/"; }; upstream "app"; policies { max-body-bytes 10; }"#,
            ),
            route("all", r#"upstream "app""#),
        ],
        &[upstream("app", &targets(&[&app]), "")],
        // A head limit below the 8 KiB that hyper's server could hold.
        "limits { max-header-bytes 2048; max-header-count 20; max-body-bytes 1000; }\n",
    ));
    let addr = daemon.listener("http");

    // Header bytes: 1.5 KB fits in 2 KiB; 4 KB (a complete head over the
    // limit, refused by the handler) and 20 KB (over it before the head
    // ends, refused by the session) do not.
    let head = |value_len: usize| {
        format!(
            "GET /h HTTP/1.1\r\nHost: test.local\r\nX-Big: {}\r\n\r\n",
            "a".repeat(value_len)
        )
    };
    let ok = exchange(addr, head(1500).as_bytes()).await;
    assert_eq!(ok.map(|r| r.status), Some(200));
    for len in [4000, 20_000] {
        let big = exchange(addr, head(len).as_bytes()).await;
        assert_eq!(big.map(|r| r.status), Some(431), "a {len}-byte header");
    }

    // Header count: 19 headers fit in 20, 25 do not.
    let many = |n: usize| {
        let mut text = String::from("GET /n HTTP/1.1\r\nHost: test.local\r\n");
        for i in 1..n {
            text.push_str(&format!("X-H{i}: {i}\r\n"));
        }
        text.push_str("\r\n");
        text
    };
    let ok = exchange(addr, many(19).as_bytes()).await;
    assert_eq!(ok.map(|r| r.status), Some(200));
    let over = exchange(addr, many(25).as_bytes()).await;
    assert_eq!(over.map(|r| r.status), Some(431));
    assert_eq!(app.heads(), 2, "a refused head reached the upstream");

    // Body: the limit itself fits; one byte more is refused, announced
    // (before anything is forwarded) or chunked (while streaming).
    let reply = fetch(addr, "POST", "/b", &[], body(vec![b'x'; 1000])).await;
    assert_eq!(reply.status, 200);
    assert_eq!(app.last().body_bytes, 1000);
    let reply = fetch(addr, "POST", "/b", &[], Zeros::sized(1001).boxed()).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(app.heads(), 3, "an announced oversized body was forwarded");
    let complete = app.complete();
    let reply = fetch(addr, "POST", "/b", &[], Zeros::chunked(5000).boxed()).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(
        app.complete(),
        complete,
        "an oversized chunked body arrived whole"
    );
    // A route's own limit.
    let reply = fetch(addr, "POST", "/small/b", &[], body("0123456789")).await;
    assert_eq!(reply.status, 200);
    let reply = fetch(addr, "POST", "/small/b", &[], body("0123456789a")).await;
    assert_eq!(reply.status, 413);
    assert_eq!(get(addr, "/after").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_surplus_connections_are_closed() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[
            listener(
                "http",
                "header-read-timeout-ms 500; keepalive-timeout-secs 1",
            ),
            listener("capped", "max-connections 2"),
        ],
        &[route("all", r#"upstream "app""#)],
        &[upstream("app", &targets(&[&app]), "")],
        "",
    ));
    let addr = daemon.listener("http");
    let capped = daemon.listener("capped");
    let request = b"GET /k HTTP/1.1\r\nHost: test.local\r\n\r\n";

    // Half a head, then nothing: dropped after the header read timeout.
    let mut slow = Raw::connect(addr).await;
    slow.send(b"GET /slow HTTP/1.1\r\nHost: test.local\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let closed = slow.closed_within(Duration::from_secs(5)).await;
    match closed {
        Some(after) => assert!(
            after >= Duration::from_millis(400) && after < Duration::from_millis(2500),
            "a stalled head was dropped after {after:?}, expected about 500 ms"
        ),
        None => panic!("a stalled request head was not dropped within 5 s"),
    }
    assert_eq!(app.heads(), 0);

    // A keep-alive connection: answered, then closed about 1 s after it
    // went idle, not before.
    let mut idle = Raw::connect(addr).await;
    idle.send(request)
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = idle.response(Duration::from_secs(10)).await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    idle.send(request)
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = idle.response(Duration::from_secs(10)).await;
    assert_eq!(
        reply.map(|r| r.status),
        Some(200),
        "a connection idle for 300 ms of a 1 s keep-alive was closed"
    );
    match idle.closed_within(Duration::from_secs(5)).await {
        Some(after) => assert!(
            after >= Duration::from_millis(800),
            "an idle connection was closed after {after:?} of a 1 s keep-alive"
        ),
        None => panic!("an idle keep-alive connection was not closed within 5 s"),
    }

    // max-connections 2: a third connection is closed at once, unanswered,
    // while the first two work; once one closes, there is room again.
    let mut first = Raw::connect(capped).await;
    let mut second = Raw::connect(capped).await;
    for conn in [&mut first, &mut second] {
        conn.send(request)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let reply = conn.response(Duration::from_secs(10)).await;
        assert_eq!(reply.map(|r| r.status), Some(200));
    }
    let mut third = Raw::connect(capped).await;
    let _ = third.send(request).await;
    assert!(
        third.response(Duration::from_secs(3)).await.is_none(),
        "a third connection was served despite max-connections 2"
    );
    for conn in [&mut first, &mut second] {
        conn.send(request)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let reply = conn.response(Duration::from_secs(10)).await;
        assert_eq!(reply.map(|r| r.status), Some(200));
    }
    drop(first);
    let mut served = None;
    for _ in 0..40 {
        if let Some(r) = exchange(
            capped,
            b"GET /again HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n",
        )
        .await
        {
            served = Some(r.status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served,
        Some(200),
        "no room after a capped connection closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_keep_their_requests_and_their_clocks() {
    if skip() {
        return;
    }
    // A keep-alive long enough that only the head clock can explain a
    // close within seconds.
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener(
            "http",
            "header-read-timeout-ms 500; keepalive-timeout-secs 30",
        )],
        &[route("all", r#"upstream "app""#)],
        &[upstream("app", &targets(&[&app]), "")],
        "",
    ));
    let addr = daemon.listener("http");
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n");
    let idle = Duration::from_millis(300);

    // Idle between requests (long enough for an idle connection to give
    // back its buffers), then served again, pipelined requests included.
    let mut conn = Raw::connect(addr).await;
    for round in 0..3 {
        tokio::time::sleep(idle).await;
        let pipelined = request(&format!("/a{round}")) + &request(&format!("/b{round}"));
        conn.send(pipelined.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        for path in ["a", "b"] {
            let reply = conn.response(Duration::from_secs(10)).await;
            assert_eq!(
                reply.map(|r| r.status),
                Some(200),
                "/{path}{round} after {idle:?} idle"
            );
        }
    }
    assert_eq!(app.heads(), 6);

    // A head started after an idle spell has the head clock, not the
    // keep-alive one: dropped after about 500 ms.
    tokio::time::sleep(idle).await;
    conn.send(b"GET /slow HTTP/1.1\r\nHost: test.local\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    match conn.closed_within(Duration::from_secs(5)).await {
        Some(after) => assert!(
            after >= Duration::from_millis(400) && after < Duration::from_millis(2500),
            "a head stalled after an idle spell was dropped after {after:?}, expected about 500 ms"
        ),
        None => panic!("a head stalled after an idle spell was not dropped within 5 s"),
    }
    // The same for a connection idle before its first byte.
    let mut late = Raw::connect(addr).await;
    tokio::time::sleep(idle).await;
    late.send(b"GET /late HTTP/1.1\r\nHost: test.local\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    match late.closed_within(Duration::from_secs(5)).await {
        Some(after) => assert!(
            after >= Duration::from_millis(400) && after < Duration::from_millis(2500),
            "a late stalled head was dropped after {after:?}, expected about 500 ms"
        ),
        None => panic!("a late stalled head was not dropped within 5 s"),
    }
    assert_eq!(app.heads(), 6, "a stalled head reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_header_count_is_held_exactly() {
    if skip() {
        return;
    }
    // The default count (100): 100 fields pass, 101 do not.
    let (app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");
    let many = |n: usize| {
        let mut text = String::from("GET /n HTTP/1.1\r\nHost: test.local\r\n");
        for i in 1..n {
            text.push_str(&format!("X-H{i}: {i}\r\n"));
        }
        text.push_str("\r\n");
        text
    };
    let ok = exchange(addr, many(100).as_bytes()).await;
    assert_eq!(ok.map(|r| r.status), Some(200));
    let over = exchange(addr, many(101).as_bytes()).await;
    assert_eq!(over.map(|r| r.status), Some(431));
    assert_eq!(app.heads(), 1, "a refused head reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_refused_and_never_forwarded() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[route("all", r#"upstream "app""#)],
        &[upstream("app", &targets(&[&app]), "")],
        // More headers than the smuggling guard's parser used to follow.
        "limits { max-header-count 1000; }\n",
    ));
    let addr = daemon.listener("http");
    // A clean request first, so a broken upstream cannot pass for a
    // refusing proxy.
    let ok = exchange(addr, b"GET /clean HTTP/1.1\r\nHost: test.local\r\n\r\n").await;
    assert_eq!(ok.map(|r| r.status), Some(200));

    let cases: [(&str, &[u8], bool); 5] = [
        (
            "Content-Length with Transfer-Encoding",
            b"POST /cl-te HTTP/1.1\r\nHost: test.local\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: test.local\r\n\r\n",
            false,
        ),
        (
            "two different Content-Lengths",
            b"POST /cl-cl HTTP/1.1\r\nHost: test.local\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcdGET /smuggled HTTP/1.1\r\nHost: test.local\r\n\r\n",
            false,
        ),
        (
            "an invalid chunk size",
            b"POST /chunk HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            // Found while streaming: the head may have gone on.
            true,
        ),
        (
            "obs-fold",
            b"GET /fold HTTP/1.1\r\nHost: test.local\r\nX-Folded: a\r\n b\r\n\r\n",
            false,
        ),
        (
            "an invalid header name",
            b"GET /name HTTP/1.1\r\nHost: test.local\r\nBad(Header): 1\r\n\r\n",
            false,
        ),
    ];
    for (what, bytes, head_may_pass) in cases {
        let heads = app.heads();
        let complete = app.complete();
        let reply = exchange(addr, bytes).await;
        assert_eq!(
            reply.as_ref().map(|r| r.status),
            Some(400),
            "{what}: expected 400, got {reply:?}"
        );
        // Let anything the proxy might have forwarded arrive.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            app.complete(),
            complete,
            "{what}: a request reached the upstream whole"
        );
        if !head_may_pass {
            assert_eq!(
                app.heads(),
                heads,
                "{what}: a request head reached the upstream"
            );
        }
    }
    // Space before the colon is another way to hide a header.
    let reply = exchange(
        addr,
        b"POST /space HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert_eq!(reply.map(|r| r.status), Some(400));

    // Behind a clean request on the same connection, however many
    // headers that one has, and whether or not it asked for an upgrade the
    // upstream did not grant.
    let upgrade = ["Connection: upgrade\r\nUpgrade: websocket\r\n".to_owned()];
    let many: Vec<String> = (0..300).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    for extra in [&[][..], &many[..], &upgrade[..]] {
        let mut stream = String::from("GET /first HTTP/1.1\r\nHost: test.local\r\n");
        stream.push_str(&extra.concat());
        stream.push_str(
            "\r\nPOST /cl-te HTTP/1.1\r\nHost: test.local\r\nContent-Length: 4\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: test.local\r\n\r\n",
        );
        let mut raw = Raw::connect(addr).await;
        raw.send(stream.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let wait = Duration::from_secs(10);
        let first = raw.response(wait).await.map(|r| r.status);
        let second = raw.response(wait).await.map(|r| r.status);
        assert_eq!(
            (first, second),
            (Some(200), Some(400)),
            "pipelined behind a request with {} extra header lines",
            extra.len()
        );
        assert!(raw.closed_within(wait).await.is_some());
        assert_eq!(app.last().target, "/first");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The invalid chunk's head may or may not have been forwarded, its
    // body never completed.
    let targets: Vec<String> = app
        .seen()
        .iter()
        .map(|s| s.target.clone())
        .filter(|t| t != "/chunk")
        .collect();
    assert_eq!(targets, ["/clean", "/first", "/first", "/first"]);
    assert_eq!(app.complete(), 4);
}

/// A client that stops sending its body is the client's fault: the
/// target that waits for it must not be counted as failing (two such
/// uploads would eject the only target, and every client would get 503),
/// and `request-timeout-secs` ends the request with 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_bodies_do_not_eject_targets() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener("http", "request-timeout-secs 1")],
        &[route("all", r#"upstream "app""#)],
        &[upstream(
            "app",
            &targets(&[&app]),
            "timeouts { read-ms 3000; }; passive-health { consecutive-failures 2; ejection-secs 60; }",
        )],
        "",
    ));
    let addr = daemon.listener("http");
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(addr).await;
        raw.send(
            b"POST /upload HTTP/1.1\r\nHost: test.local\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
        let started = std::time::Instant::now();
        let status = raw
            .response(Duration::from_secs(10))
            .await
            .map(|r| r.status);
        assert_eq!(
            status,
            Some(408),
            "a stalled upload must be the client's timeout, not the upstream's"
        );
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "a stalled upload outlived request-timeout-secs 1: {:?}",
            started.elapsed()
        );
        stalled.push(raw);
    }
    let reply = get(addr, "/after").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        super::metric(
            &daemon,
            "sentinel_upstream_health",
            &[("upstream", "app"), ("target", &app.target())]
        ),
        1.0
    );
}

/// A client that stalls its body for the read timeout gets 408 even
/// without a request deadline, and a slow upstream after a complete body
/// is still the upstream's 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_side_that_stalls_is_the_one_that_times_out() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener("http", "request-timeout-secs 0")],
        &[route("all", r#"upstream "app""#)],
        &[upstream(
            "app",
            &targets(&[&app]),
            "timeouts { read-ms 700; }; retries 0",
        )],
        "",
    ));
    let addr = daemon.listener("http");
    let mut raw = Raw::connect(addr).await;
    raw.send(b"POST /upload HTTP/1.1\r\nHost: test.local\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let status = raw
        .response(Duration::from_secs(10))
        .await
        .map(|r| r.status);
    assert_eq!(status, Some(408));

    let mut raw = Raw::connect(addr).await;
    raw.send(b"POST /?sleep_ms=3000 HTTP/1.1\r\nHost: test.local\r\nContent-Length: 4\r\n\r\nbody")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let status = raw
        .response(Duration::from_secs(10))
        .await
        .map(|r| r.status);
    assert_eq!(status, Some(504));
}
