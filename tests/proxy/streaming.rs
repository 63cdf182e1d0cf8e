//! Bodies far larger than memory should hold, both ways; upgraded
//! connections (WebSocket) carried byte for byte.

use std::time::Duration;

use sentinel_tests::http::{Raw, Upstream, Zeros, empty, fetch_counting};

use super::{app_behind, blocks, listener, proc_kib, route, skip, start, targets, upstream};

const GIB: u64 = 1 << 30;
/// The daemon's peak resident memory may not pass this while a gigabyte
/// streams through.
const MAX_RSS_KIB: u64 = 200 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabyte_bodies_stream_through_in_bounded_memory() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[route(
            "all",
            r#"upstream "app"; policies { max-body-bytes 0; }"#,
        )],
        &[upstream("app", &targets(&[&app]), "")],
        "",
    ));
    let addr = daemon.listener("http");
    let pid = daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon is not running"));
    let before = proc_kib(pid, "VmHWM");

    // Upload: the upstream counts every byte.
    let limit = Duration::from_secs(120);
    let (status, _) = fetch_counting(addr, "PUT", "/upload", Zeros::sized(GIB).boxed(), limit)
        .await
        .unwrap_or_else(|e| panic!("1 GiB upload: {e}"));
    assert_eq!(status, 200);
    let seen = app.last();
    assert_eq!(
        (seen.method.as_str(), seen.body_bytes, seen.complete),
        ("PUT", GIB, true)
    );
    let after_upload = proc_kib(pid, "VmHWM");

    // Download: the client counts every byte.
    let (status, received) =
        fetch_counting(addr, "GET", &format!("/big?bytes={GIB}"), empty(), limit)
            .await
            .unwrap_or_else(|e| panic!("1 GiB download: {e}"));
    assert_eq!((status.as_u16(), received), (200, GIB));
    let peak = proc_kib(pid, "VmHWM");
    assert!(
        peak < MAX_RSS_KIB,
        "the daemon's peak resident memory reached {peak} KiB (before: {before} KiB, after the upload: {after_upload} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_carry_bytes_both_ways() {
    if skip() {
        return;
    }
    let (app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");
    let wait = Duration::from_secs(10);

    let mut ws = Raw::connect(addr).await;
    ws.send(
        b"GET /ws HTTP/1.1\r\nHost: test.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap_or_else(|e| panic!("send: {e}"));
    let reply = ws
        .response(wait)
        .await
        .unwrap_or_else(|| panic!("no answer to the upgrade request"));
    assert_eq!(reply.status, 101, "{}", reply.head);
    assert_eq!(reply.header("upgrade"), Some("websocket"));
    assert!(
        reply
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{}",
        reply.head
    );
    let seen = app.last();
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("connection"), Some("upgrade"));
    assert_eq!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    // An upgrade goes through hyper's client, which gets the forwarding
    // fields added to its copy of the head.
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert!(
        seen.header("forwarded")
            .is_some_and(|f| f.starts_with("for=127.0.0.1;proto=http"))
    );

    // The upstream speaks first, then echoes.
    assert_eq!(
        ws.read_exact(8, wait).await.as_deref(),
        Some(&b"welcome\n"[..])
    );
    ws.send(b"ping-1")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    assert_eq!(
        ws.read_exact(6, wait).await.as_deref(),
        Some(&b"ping-1"[..])
    );
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    ws.send(&payload)
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let echoed = ws.read_exact(payload.len(), wait).await;
    assert!(
        echoed.as_deref() == Some(&payload[..]),
        "256 KiB did not echo intact"
    );
}
