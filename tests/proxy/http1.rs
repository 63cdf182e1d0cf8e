//! HTTP/1.1 on the client's side, byte by byte: `100-continue`, HTTP/1.0
//! clients, chunked request bodies, `HEAD`, `Connection: close`, and the
//! connection carrying on (or not) after each.

use std::time::Duration;

use sentinel_tests::http::Raw;

use super::{app_behind, proc_kib, skip};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_when_the_body_is_wanted() {
    if skip() {
        return;
    }
    let (app, daemon) = app_behind("limits { max-body-bytes 100; }\n").await;
    let addr = daemon.listener("http");

    // The client waits for `100 Continue` before it sends its body.
    let mut conn = Raw::connect(addr).await;
    conn.send(
        b"POST /echo HTTP/1.1\r\nHost: test.local\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap_or_else(|e| panic!("send: {e}"));
    let interim = conn.head(WAIT).await.expect("an interim response");
    assert!(
        interim.starts_with("HTTP/1.1 100"),
        "expected 100 Continue, got {interim:?}"
    );
    conn.send(b"hello")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = conn.response(WAIT).await.expect("a response");
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(reply.body, b"hello");
    let seen = app.last();
    assert_eq!(seen.body_bytes, 5);
    assert_eq!(seen.header("expect"), None, "the handshake was forwarded");

    // A body announced over the limit is refused at once, never asked for.
    let mut conn = Raw::connect(addr).await;
    conn.send(
        b"POST /echo HTTP/1.1\r\nHost: test.local\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = conn.response(WAIT).await.expect("a response");
    assert_eq!(reply.status, 413, "{}", reply.head);
    assert_eq!(app.heads(), 1, "a refused body's head was forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_get_their_own_keep_alive_rules() {
    if skip() {
        return;
    }
    let (app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");

    // HTTP/1.0 without keep-alive: answered, then closed.
    let mut conn = Raw::connect(addr).await;
    conn.send(b"GET /old HTTP/1.0\r\nHost: test.local\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = conn.response(WAIT).await.expect("a response");
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert!(reply.head.starts_with("HTTP/1.0 200"), "{}", reply.head);
    assert!(!reply.body.is_empty());
    assert!(
        conn.closed_within(Duration::from_secs(5)).await.is_some(),
        "an HTTP/1.0 connection without keep-alive stayed open"
    );
    // The upstream still got HTTP/1.1 from the proxy.
    assert_eq!(app.last().version, http::Version::HTTP_11);

    // HTTP/1.0 with `Connection: keep-alive`: kept, and says so.
    let mut conn = Raw::connect(addr).await;
    for path in ["/one", "/two"] {
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: test.local\r\nConnection: keep-alive\r\n\r\n");
        conn.send(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let reply = conn
            .response(WAIT)
            .await
            .expect("a response on the kept connection");
        assert_eq!(reply.status, 200, "{}", reply.head);
        assert_eq!(
            reply
                .header("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("keep-alive"),
            "{}",
            reply.head
        );
        assert!(reply.header("content-length").is_some(), "{}", reply.head);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_head_and_close_leave_the_connection_in_order() {
    if skip() {
        return;
    }
    let (app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");
    let mut conn = Raw::connect(addr).await;

    // A chunked body, with an extension and a trailer, reaches the upstream
    // whole; the connection then carries the next request.
    conn.send(
        b"POST /echo HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    .await
    .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = conn.response(WAIT).await.expect("a response");
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(reply.body, b"hello world");
    assert!(app.last().complete);

    // HEAD: a head alone, so that the next response is read from its
    // first byte.
    conn.send(b"HEAD /head HTTP/1.1\r\nHost: test.local\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let head = conn.head(WAIT).await.expect("a HEAD response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    conn.send(b"GET /after-head HTTP/1.1\r\nHost: test.local\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = conn.response(WAIT).await.expect("a response after HEAD");
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(app.last().target, "/after-head");

    // `Connection: close`: answered, said so, and closed.
    conn.send(b"GET /last HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = conn.response(WAIT).await.expect("a response");
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(reply.header("connection"), Some("close"), "{}", reply.head);
    assert!(
        conn.closed_within(Duration::from_secs(5)).await.is_some(),
        "the connection stayed open after Connection: close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_refused_and_the_proxy_serves_on() {
    if skip() {
        return;
    }
    let (app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");
    let cases: [(&str, &[u8]); 9] = [
        ("binary junk", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        ("no version", b"GET /\r\nHost: test.local\r\n\r\n"),
        ("a NUL in a field value", b"GET / HTTP/1.1\r\nHost: test.local\r\nX-A: a\x00b\r\n\r\n"),
        ("a field without a colon", b"GET / HTTP/1.1\r\nHost test.local\r\n\r\n"),
        ("a space before the colon", b"GET / HTTP/1.1\r\nHost : test.local\r\n\r\n"),
        ("a length past u64", b"POST / HTTP/1.1\r\nHost: test.local\r\nContent-Length: 99999999999999999999\r\n\r\n"),
        ("a negative length", b"POST / HTTP/1.1\r\nHost: test.local\r\nContent-Length: -1\r\n\r\n"),
        ("a chunk size past u64", b"POST / HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nx\r\n0\r\n\r\n"),
        ("a request line of 100 KB", &[b'G'; 100 * 1024]),
    ];
    for (what, bytes) in cases {
        let mut conn = Raw::connect(addr).await;
        // The proxy may refuse before it has read all of it.
        let _ = conn.send(bytes).await;
        if let Some(reply) = conn.response(WAIT).await {
            assert!(
                matches!(reply.status, 400 | 413 | 431),
                "{what}: answered {}",
                reply.head
            );
        }
        assert!(
            conn.closed_within(Duration::from_secs(5)).await.is_some(),
            "{what}: the connection stayed open"
        );
    }
    // Only the chunk size past u64 has a head that may go on before its
    // body fails; its request never arrives whole.
    assert!(app.heads() <= 1, "a malformed request reached the upstream");
    assert_eq!(app.complete(), 0, "a malformed body arrived whole");
    let before = app.heads();
    // Still serving, on a new connection and on a kept one.
    let mut conn = Raw::connect(addr).await;
    for path in ["/after-1", "/after-2"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n");
        conn.send(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let reply = conn.response(WAIT).await.expect("a response");
        assert_eq!(reply.status, 200, "{}", reply.head);
    }
    assert_eq!(app.heads(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_pipelined_bytes_is_read_only_so_far_and_the_answer_comes() {
    if skip() {
        return;
    }
    let (_app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");
    let pid = daemon.pid().expect("the daemon's pid");
    let before = proc_kib(pid, "VmHWM");
    // A request that closes the connection, sent with 32 MiB of pipelined
    // requests behind it while it is handled: the session reads ahead only
    // so far (64 KiB), the rest waits in the kernel, and the answer comes.
    let mut conn = Raw::connect(addr).await;
    let mut bytes =
        b"GET /first?sleep_ms=300 HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n"
            .to_vec();
    let next = b"GET /next HTTP/1.1\r\nHost: test.local\r\n\r\n";
    while bytes.len() < 32 * 1024 * 1024 {
        bytes.extend_from_slice(next);
    }
    // The send blocks once the socket buffers are full, until the proxy
    // closes; its result does not matter.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.send(&bytes)).await;
    let reply = conn
        .response(WAIT)
        .await
        .expect("the first request's answer");
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(reply.header("connection"), Some("close"), "{}", reply.head);
    let grown = proc_kib(pid, "VmHWM").saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "the daemon's peak memory grew by {grown} KiB under 32 MiB of pipelined bytes"
    );
}
