//! What the proxy makes of each kind of answer from an HTTP/1.1 target,
//! through the real binary: a scripted target writes raw bytes, the
//! client sees what the codec of `proxy/h1.rs` made of them.

use std::{net::SocketAddr, time::Duration};

use sentinel_tests::http::get;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{blocks, listener, metric, route, skip, start, upstream};

/// The answer to a request for `path`, and whether the target closes the
/// connection after writing it.
fn answer(path: &str) -> (Vec<u8>, bool) {
    let fixed = |bytes: &[u8], close| (bytes.to_vec(), close);
    match path {
        "/chunked" => fixed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
            false,
        ),
        "/interim" => fixed(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/until-close" => fixed(b"HTTP/1.1 200 OK\r\n\r\nuntil the close", true),
        "/garbage" => fixed(b"NOT HTTP AT ALL\r\n\r\n", true),
        "/lengths" => fixed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            false,
        ),
        "/huge" => (
            format!(
                "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
                "b".repeat(70 * 1024)
            )
            .into_bytes(),
            false,
        ),
        "/cut" => fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true),
        _ => fixed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
    }
}

/// A target that answers each request head by its path, on as many
/// keep-alive connections as it is given.
async fn scripted() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let (bytes, close) = answer(&path);
                    if stream.write_all(&bytes).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_target_answer() {
    if skip() {
        return;
    }
    let target = scripted().await;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[route("all", r#"upstream "scripted""#)],
        &[upstream("scripted", &[target.to_string()], "retries 0")],
        "",
    ));
    let addr = daemon.listener("http");

    // Well-formed answers pass through, chunked and close-delimited
    // bodies whole, interim responses left out.
    let reply = get(addr, "/chunked").await;
    assert_eq!(
        (reply.status.as_u16(), reply.text()),
        (200, "hello world".to_owned())
    );
    let reply = get(addr, "/interim").await;
    assert_eq!(
        (reply.status.as_u16(), reply.text()),
        (200, "ok".to_owned())
    );
    let reply = get(addr, "/until-close").await;
    assert_eq!(
        (reply.status.as_u16(), reply.text()),
        (200, "until the close".to_owned())
    );

    // Answers that are not HTTP, or that cannot be framed, are 502s.
    for path in ["/garbage", "/lengths", "/huge"] {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, 502, "{path}: {}", reply.text());
    }
    assert_eq!(
        metric(
            &daemon,
            "sentinel_upstream_requests_total",
            &[("upstream", "scripted"), ("result", "error")]
        ),
        3.0
    );

    // A body cut short by the target: the client's connection is ended
    // (closed or reset) short of the announced length, never left waiting
    // and never handed a complete body.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(b"GET /cut HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got)).await;
    assert!(ended.is_ok(), "the proxy left the client waiting");
    let got = String::from_utf8_lossy(&got);
    if let Some((_, body)) = got.split_once("\r\n\r\n") {
        assert!(body.len() < 10, "a complete body for a cut one: {got}");
    }

    // And the proxy goes on serving.
    let reply = get(addr, "/chunked").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}
