//! HTTP/2 with prior knowledge on a plain listener; TLS listeners: ALPN,
//! certificates chosen by SNI, the minimum version, client certificates.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::Version;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::{ProtocolVersion, pki_types::CertificateDer, version};
use sentinel_tests::{
    http::{BoxError, Reply, Upstream, empty, fetch, h2c, request, send_on, tls_connect},
    tls::{Issued, Pki},
};
use tokio::net::TcpStream;

use super::{app_behind, blocks, listener, route, skip, start, targets, upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_and_http2_upstreams() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[
            route(
                "h2",
                r#"priority 1; matches { path-prefix "/h2/"; }; upstream "app-h2""#,
            ),
            route("h1", r#"upstream "app-h1""#),
        ],
        &[
            upstream("app-h1", &targets(&[&app]), ""),
            upstream("app-h2", &targets(&[&app]), r#"protocol "http2""#),
        ],
        "",
    ));
    let addr = daemon.listener("http");

    // HTTP/2 from the client, HTTP/1.1 to the upstream.
    let reply = h2c(addr, "GET", "/plain?q=1", &[("x-kept", "yes")]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.version),
        (200, Version::HTTP_2)
    );
    assert_eq!(reply.upstream(), "app");
    assert!(reply.header("x-request-id").is_some());
    let seen = app.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.target, "/plain?q=1");
    assert_eq!(seen.header("host"), Some("test.local"));
    assert_eq!(seen.header("x-forwarded-host"), Some("test.local"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-kept"), Some("yes"));

    // HTTP/2 both ways, and HTTP/1.1 in front of HTTP/2.
    let reply = h2c(addr, "POST", "/h2/x", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.version),
        (200, Version::HTTP_2)
    );
    let seen = app.last();
    assert_eq!(
        (seen.version, seen.method.as_str()),
        (Version::HTTP_2, "POST")
    );
    // `:authority` names the target (its pooled connection); the client's
    // host travels in the forwarding headers.
    assert_eq!(seen.authority, Some(app.target()));
    assert_eq!(seen.header("x-forwarded-host"), Some("test.local"));
    let reply = fetch(addr, "GET", "/h2/y", &[], empty()).await;
    assert_eq!(
        (reply.status.as_u16(), reply.version),
        (200, Version::HTTP_11)
    );
    assert_eq!(app.last().version, Version::HTTP_2);
    assert_eq!(app.complete(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_after_a_pause_before_the_preface() {
    if skip() {
        return;
    }
    // A plain connection idle before its first byte gives back its
    // buffers; whether it speaks HTTP/2 is still told by its first bytes.
    let (app, daemon) = app_behind("").await;
    let addr = daemon.listener("http");
    let late = async {
        let stream = TcpStream::connect(addr).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        send_on(stream, true, request("GET", "/late", &[], empty(), true)).await
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .unwrap_or_else(|_| panic!("h2c after a pause timed out"))
        .unwrap_or_else(|e| panic!("h2c after a pause failed: {e}"));
    assert_eq!(
        (reply.status.as_u16(), reply.version),
        (200, Version::HTTP_2)
    );
    assert_eq!(app.last().target, "/late");
}

/// Connects with `config` for `name` and sends one GET over whatever ALPN
/// chose; the reply, the chosen protocol, the TLS version and the server's
/// certificate.
async fn over_tls(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<
    (
        Reply,
        Option<Vec<u8>>,
        ProtocolVersion,
        CertificateDer<'static>,
    ),
    BoxError,
> {
    let tls = tls_connect(addr, config, name).await?;
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let tls_version = session
        .protocol_version()
        .ok_or("no TLS version after the handshake")?;
    let cert = session
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no server certificate")?
        .clone()
        .into_owned();
    let h2 = alpn.as_deref() == Some(b"h2");
    let reply = send_on(tls, h2, request("GET", "/tls", &[], empty(), h2)).await?;
    Ok((reply, alpn, tls_version, cert))
}

fn tls_block(cert: &Issued, extra: &str) -> String {
    format!(
        "protocol \"https\"\n        tls {{\n            cert-file \"{}\"\n            key-file \"{}\"\n            {extra}\n        }}",
        cert.cert_file.display(),
        cert.key_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_sni_versions_and_client_certificates() {
    if skip() {
        return;
    }
    let pki = Pki::new("test");
    let default = pki.server("default", &["default.test"]);
    let api = pki.server("api", &["api.example.com", "*.api.example.com"]);
    let client = pki.client("client", "client-1");
    let other = Pki::new("other");
    let stranger = other.client("stranger", "stranger");
    let app = Upstream::start("app").await;
    let sni = format!(
        "sni {{\n                certificate \"api.example.com\" \"*.api.example.com\" {{\n                    cert-file \"{}\"\n                    key-file \"{}\"\n                }}\n            }}",
        api.cert_file.display(),
        api.key_file.display()
    );
    let daemon = start(&blocks(
        &[
            listener("https", &tls_block(&default, &sni)),
            listener("strict", &tls_block(&default, r#"min-version "1.3""#)),
            listener(
                "mtls",
                &tls_block(
                    &default,
                    &format!(
                        "client-auth \"required\"\n            client-ca \"{}\"",
                        pki.ca_file().display()
                    ),
                ),
            ),
        ],
        &[route("all", r#"upstream "app""#)],
        &[upstream("app", &targets(&[&app]), "")],
        "",
    ));
    let https = daemon.listener("https");
    let strict = daemon.listener("strict");
    let mtls = daemon.listener("mtls");
    let both = [&version::TLS13, &version::TLS12];

    // ALPN: h2 when offered, else HTTP/1.1.
    let h2_first = pki.client_config(&both, &[b"h2", b"http/1.1"], None);
    let (reply, alpn, _, _) = over_tls(https, h2_first.clone(), "default.test")
        .await
        .unwrap_or_else(|e| panic!("TLS with ALPN h2: {e}"));
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        (reply.status.as_u16(), reply.version),
        (200, Version::HTTP_2)
    );
    assert_eq!(app.last().header("x-forwarded-proto"), Some("https"));
    for offered in [&[&b"http/1.1"[..]][..], &[]] {
        let config = pki.client_config(&both, offered, None);
        let (reply, alpn, _, _) = over_tls(https, config, "default.test")
            .await
            .unwrap_or_else(|e| panic!("TLS offering {offered:?}: {e}"));
        let expected_alpn = offered.first().map(|p| p.to_vec());
        assert_eq!(alpn, expected_alpn);
        assert_eq!(
            (reply.status.as_u16(), reply.version),
            (200, Version::HTTP_11)
        );
    }

    // SNI picks the certificate: exact, wildcard, default.
    for (name, want, which) in [
        ("api.example.com", &api, "api"),
        ("v2.api.example.com", &api, "api"),
        ("default.test", &default, "default"),
    ] {
        let (reply, _, _, cert) = over_tls(https, h2_first.clone(), name)
            .await
            .unwrap_or_else(|e| panic!("TLS for {name}: {e}"));
        assert_eq!(reply.status, 200);
        assert!(
            cert == want.cert,
            "SNI {name} did not get the {which} certificate"
        );
    }

    // TLS 1.2 is accepted by default, refused where 1.3 is the minimum.
    let tls12 = pki.client_config(&[&version::TLS12], &[b"http/1.1"], None);
    let (_, _, v, _) = over_tls(https, tls12.clone(), "default.test")
        .await
        .unwrap_or_else(|e| panic!("TLS 1.2 to the default listener: {e}"));
    assert_eq!(v, ProtocolVersion::TLSv1_2);
    assert!(
        tls_connect(strict, tls12, "default.test").await.is_err(),
        "a TLS 1.2-only client got through min-version 1.3"
    );
    let (reply, _, v, _) = over_tls(strict, h2_first.clone(), "default.test")
        .await
        .unwrap_or_else(|e| panic!("TLS 1.3 to the strict listener: {e}"));
    assert_eq!((reply.status.as_u16(), v), (200, ProtocolVersion::TLSv1_3));

    // Client certificates: none and a stranger's are refused (with TLS 1.3
    // the server says so after the client's handshake, so the exchange
    // fails), one signed by client-ca is accepted.
    let before = app.heads();
    for (what, identity) in [("no certificate", None), ("a foreign CA", Some(&stranger))] {
        let config = pki.client_config(&both, &[b"http/1.1"], identity);
        let result = over_tls(mtls, config, "default.test").await;
        assert!(
            result.is_err(),
            "a client with {what} got through client-auth required: {:?}",
            result.map(|r| r.0.status)
        );
    }
    assert_eq!(app.heads(), before, "a refused client's request arrived");
    let config = pki.client_config(&both, &[b"h2"], Some(&client));
    let (reply, _, _, _) = over_tls(mtls, config, "default.test")
        .await
        .unwrap_or_else(|e| panic!("TLS with a client certificate: {e}"));
    assert_eq!(reply.status, 200);
    assert_eq!(app.heads(), before + 1);
}

/// A TLS upstream for `upstream.test` (certificate from `pki`) that
/// answers `tls <target>`; its address and how many connections it took.
async fn tls_upstream(pki: &Pki) -> (SocketAddr, Arc<AtomicUsize>) {
    let cert = pki.server("upstream", &["upstream.test"]);
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.clone()], cert.key())
        .unwrap_or_else(|e| panic!("upstream TLS config: {e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("cannot bind the TLS upstream: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no address: {e}"));
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let text = format!("tls {}", req.uri());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(text)),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_and_their_connections_reused() {
    if skip() {
        return;
    }
    let pki = Pki::new("upstream");
    let (addr, connections) = tls_upstream(&pki).await;
    let daemon = start(&blocks(
        &[listener("http", "")],
        &[route("all", r#"upstream "secure""#)],
        &[upstream(
            "secure",
            &[addr.to_string()],
            &format!(
                "tls {{ sni \"upstream.test\"; ca-cert \"{}\"; }}\n        connection-pool {{ idle-timeout-secs 1; }}",
                pki.ca_file().display()
            ),
        )],
        "",
    ));
    let proxy = daemon.listener("http");
    for i in 0..5 {
        let reply = fetch(proxy, "GET", &format!("/s/{i}?q=1"), &[], empty()).await;
        assert_eq!(reply.status.as_u16(), 200);
        assert_eq!(reply.text(), format!("tls /s/{i}?q=1"));
    }
    // One after the other, the five requests share one TLS connection.
    assert_eq!(connections.load(Ordering::Relaxed), 1);
    // Idle past the pool's timeout, it is not used again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reply = fetch(proxy, "GET", "/again", &[], empty()).await;
    assert_eq!(reply.text(), "tls /again");
    assert_eq!(connections.load(Ordering::Relaxed), 2);
}

/// An HTTP/1.1 connection over TLS idle between requests gives back
/// its HTTP session and keeps its TLS session: it is served again after
/// each pause, and closed once idle past the keep-alive timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_keep_alive_connections_are_served_after_idle_spells_and_closed_after_the_timeout() {
    if skip() {
        return;
    }
    let pki = Pki::new("test");
    let default = pki.server("default", &["default.test"]);
    let app = Upstream::start("app").await;
    let daemon = start(&blocks(
        &[listener(
            "https",
            &format!(
                "keepalive-timeout-secs 1\n        {}",
                tls_block(&default, "")
            ),
        )],
        &[route("all", r#"upstream "app""#)],
        &[upstream("app", &targets(&[&app]), "")],
        "",
    ));
    let addr = daemon.listener("https");
    let config = pki.client_config(&[&version::TLS13, &version::TLS12], &[b"http/1.1"], None);
    let tls = tls_connect(addr, config, "default.test")
        .await
        .unwrap_or_else(|e| panic!("TLS connect: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap_or_else(|e| panic!("HTTP/1.1 handshake: {e}"));
    let conn = tokio::spawn(conn);
    for round in 0..3 {
        // Longer than the 20 ms after which an idle connection parks.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let path = format!("/idle{round}");
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            sender.send_request(request("GET", &path, &[], empty(), false)),
        )
        .await
        .unwrap_or_else(|_| panic!("{path} timed out"))
        .unwrap_or_else(|e| panic!("{path} after an idle spell: {e}"));
        assert_eq!(reply.status(), 200, "{path}");
        reply
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{path} body: {e}"));
        assert_eq!(app.last().target, path);
    }
    let idle_since = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .unwrap_or_else(|_| panic!("an idle TLS connection was not closed within 5 s"))
        .unwrap_or_else(|e| panic!("client connection task: {e}"))
        .unwrap_or_else(|e| panic!("client connection: {e}"));
    assert!(
        idle_since.elapsed() >= Duration::from_millis(700),
        "an idle TLS connection was closed after {:?} of a 1 s keep-alive",
        idle_since.elapsed()
    );
}
