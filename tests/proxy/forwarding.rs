//! What reaches the upstream and what comes back: forwarding headers,
//! request ids, hop-by-hop headers; which route a request takes.

use std::net::SocketAddr;

use sentinel_tests::http::{Upstream, body, empty, exchange, fetch, get};

use super::{app_behind, blocks, listener, route, skip, start, targets, upstream};

fn is_uuid(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_request_ids_and_hop_by_hop() {
    if skip() {
        return;
    }
    let (app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");

    // A GET without a request id, with every kind of hop-by-hop header.
    let reply = fetch(
        addr,
        "GET",
        "/get?x=1",
        &[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic eDp5"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
        ],
        empty(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), "app");
    let id = reply
        .header("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id in {:?}", reply.headers))
        .to_owned();
    assert!(is_uuid(&id), "generated request id {id:?} is not a UUID");
    let seen = app.last();
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("GET", "/get?x=1")
    );
    assert_eq!(seen.header("x-request-id"), Some(id.as_str()));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("test.local"));
    assert_eq!(
        seen.header("forwarded"),
        Some(r#"for=127.0.0.1;proto=http;host="test.local""#)
    );
    assert_eq!(seen.header("host"), Some("test.local"));
    assert_eq!(seen.header("x-kept"), Some("yes"));
    for hop in [
        "connection",
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        assert_eq!(seen.header(hop), None, "the upstream got '{hop}'");
    }

    // A POST with a body, keeping the client's request id and appending
    // to its X-Forwarded-For.
    let reply = fetch(
        addr,
        "POST",
        "/post",
        &[
            ("x-request-id", "client-id-42"),
            ("x-forwarded-for", "203.0.113.9"),
            ("content-type", "text/plain"),
        ],
        body("hello world"),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-request-id"), Some("client-id-42"));
    let seen = app.last();
    assert_eq!(seen.method, "POST");
    assert_eq!((seen.body_bytes, seen.complete), (11, true));
    assert_eq!(seen.header("content-length"), Some("11"));
    assert_eq!(seen.header("content-type"), Some("text/plain"));
    assert_eq!(seen.header("x-request-id"), Some("client-id-42"));
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );

    // Forwarding headers the client sends about itself are not believed;
    // an id that is not a sane token is replaced.
    let reply = fetch(
        addr,
        "GET",
        "/spoof",
        &[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-request-id", "two words"),
        ],
        empty(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = app.last();
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("test.local"));
    let id = seen.header("x-request-id").unwrap_or_default();
    assert!(is_uuid(id), "request id {id:?} was not replaced");
    assert_eq!(reply.header("x-request-id"), Some(id));

    // Two requests without an id get different ones.
    let first = get(addr, "/a").await;
    let second = get(addr, "/b").await;
    assert_ne!(
        first.header("x-request-id"),
        second.header("x-request-id"),
        "request ids repeat"
    );

    // Hop-by-hop headers of the response stop at the proxy too.
    let reply = get(addr, "/hop?hop=1").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-hop-secret"), None, "{:?}", reply.headers);
    assert_eq!(reply.header("keep-alive"), None, "{:?}", reply.headers);
    assert_ne!(reply.header("connection"), Some("x-hop-secret"));
    assert_eq!(app.complete(), 6);
}

/// Status, answering upstream and body of one request.
async fn go(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let r = fetch(addr, method, path, headers, empty()).await;
    (r.status.as_u16(), r.upstream().to_owned(), r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_path_host_method_header_and_priority() {
    if skip() {
        return;
    }
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[
            // Earlier in the file than "api", but of lower priority.
            route(
                "low",
                r#"priority 1; matches { path-prefix "/api/"; }; static-response 200 "low""#,
            ),
            route(
                "api",
                r#"priority 10; matches { path-prefix "/api/"; }; upstream "a""#,
            ),
            route(
                "teapot",
                r#"priority 50; matches { path-prefix "/api/teapot"; }; static-response 418 "short and stout""#,
            ),
            route(
                "exact",
                r#"priority 10; matches { path "/healthz"; }; static-response 200 "exact""#,
            ),
            route(
                "hosts",
                r#"priority 5; matches { host "*.example.com"; }; upstream "b""#,
            ),
            route(
                "delete",
                r#"priority 5; matches { method "DELETE"; }; static-response 202 "deleted""#,
            ),
            route(
                "prod",
                r#"priority 20; matches { header "x-env" "prod"; }; static-response 200 "prod""#,
            ),
        ],
        &[
            upstream("a", &targets(&[&a]), ""),
            upstream("b", &targets(&[&b]), ""),
        ],
        "",
    ));
    let addr = daemon.listener("http");

    let (status, upstream, _) = go(addr, "GET", "/api/users", &[]).await;
    assert_eq!((status, upstream.as_str()), (200, "a"));
    assert_eq!(a.last().target, "/api/users");
    // Priority, not file order nor prefix length, decides.
    let (status, _, text) = go(addr, "GET", "/api/teapot/1", &[]).await;
    assert_eq!((status, text.as_str()), (418, "short and stout"));
    let (status, _, text) = go(addr, "GET", "/api/users", &[("x-env", "prod")]).await;
    assert_eq!((status, text.as_str()), (200, "prod"));
    let (status, upstream, _) = go(addr, "GET", "/api/users", &[("x-env", "dev")]).await;
    assert_eq!((status, upstream.as_str()), (200, "a"));
    // An exact path is not a prefix.
    let (status, _, text) = go(addr, "GET", "/healthz", &[]).await;
    assert_eq!((status, text.as_str()), (200, "exact"));
    let (status, _, _) = go(addr, "GET", "/healthz/more", &[]).await;
    assert_eq!(status, 404);
    // A wildcard host needs at least one more label; case and port do
    // not matter.
    let (status, upstream, _) = go(addr, "GET", "/x", &[("host", "shop.example.com")]).await;
    assert_eq!((status, upstream.as_str()), (200, "b"));
    assert_eq!(b.last().header("host"), Some("shop.example.com"));
    let (status, upstream, _) = go(addr, "GET", "/x", &[("host", "A.B.Example.COM:8080")]).await;
    assert_eq!((status, upstream.as_str()), (200, "b"));
    let (status, _, _) = go(addr, "GET", "/x", &[("host", "example.com")]).await;
    assert_eq!(status, 404);
    // An absolute-form target's authority, not Host, is the request's
    // host (RFC 9112 §3.2.2), for routing and for the upstream alike.
    let reply = exchange(
        addr,
        b"GET http://shop.example.com/abs HTTP/1.1\r\nHost: test.local\r\n\r\n",
    )
    .await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    let seen = b.last();
    assert_eq!(seen.target, "/abs");
    assert_eq!(seen.header("host"), Some("shop.example.com"));
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example.com"));
    // Method.
    let (status, _, text) = go(addr, "DELETE", "/x", &[]).await;
    assert_eq!((status, text.as_str()), (202, "deleted"));
    // Nothing matches: 404 from the proxy itself.
    let (status, upstream, text) = go(addr, "GET", "/x", &[]).await;
    assert_eq!((status, upstream.as_str()), (404, "-"));
    assert_eq!(text, "404 Not Found\n");
    assert_eq!(a.heads(), 2);
    assert_eq!(b.heads(), 3);
}
