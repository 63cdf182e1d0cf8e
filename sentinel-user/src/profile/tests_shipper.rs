//! Tests of the shipper against real collectors on 127.0.0.1:0, plain and
//! TLS: order, exactly once, outages, refusals, restarts, retention.

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{
    metrics::ProfileMetrics,
    shipper::{
        BATCH_CONTENT_TYPE, CURSOR_FILE, Shipper, ShipperError, ShipperHandle, ShipperOptions,
        ShipperTls, backoff_delay,
    },
    store::{Position, Store, StoreHandle, StoreOptions, list_segments},
};

/// What a test collector saw.
#[derive(Default)]
struct Seen {
    /// Records of acknowledged batches, in arrival order.
    records: Vec<Value>,
    /// Every request's headers and record count, acknowledged or not.
    requests: Vec<(HeaderMap, usize)>,
}

struct Collector {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    /// Statuses to answer with, in order; 200 once empty.
    script: Arc<Mutex<VecDeque<u16>>>,
    stop: CancellationToken,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Collector {
    async fn start(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let stop = CancellationToken::new();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let (s, sc, st) = (seen.clone(), script.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = st.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (seen, script, acceptor) = (s.clone(), sc.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (seen, script) = (seen.clone(), script.clone());
                        async move { Ok::<_, Infallible>(answer(request, &seen, &script).await) }
                    });
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(tls), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            script,
            stop,
        }
    }

    async fn plain() -> Self {
        Self::start(TcpListener::bind("127.0.0.1:0").await.expect("bind"), None).await
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}/ingest", self.addr)
    }

    fn seqs(&self) -> Vec<u64> {
        let seen = self.seen.lock().expect("lock");
        seen.records
            .iter()
            .map(|r| r["seq"].as_u64().expect("seq"))
            .collect()
    }
}

async fn answer(
    request: Request<Incoming>,
    seen: &Mutex<Seen>,
    script: &Mutex<VecDeque<u16>>,
) -> Response<Full<Bytes>> {
    let headers = request.headers().clone();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return status(400),
    };
    // The body must be NDJSON: objects, one a line, each line ended.
    let Ok(text) = std::str::from_utf8(&body) else {
        return status(400);
    };
    if !text.ends_with('\n') {
        return status(400);
    }
    let mut records = Vec::new();
    for line in text.lines() {
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => records.push(v),
            _ => return status(400),
        }
    }
    let code = script.lock().expect("lock").pop_front().unwrap_or(200);
    let mut seen = seen.lock().expect("lock");
    seen.requests.push((headers, records.len()));
    if (200..300).contains(&code) {
        seen.records.extend(records);
    }
    status(code)
}

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    response
}

fn store_options(dir: &Path, max_file_bytes: u64, max_files: usize) -> StoreOptions {
    StoreOptions {
        dir: dir.to_owned(),
        max_file_bytes,
        max_files,
        queue_capacity: 4096,
        fsync_interval: Duration::from_millis(100),
        metrics: ProfileMetrics::new(&Registry::new()),
    }
}

fn start_store(options: StoreOptions) -> StoreHandle {
    let (store, task) = Store::open(options).expect("open store");
    tokio::spawn(task.run());
    store
}

fn fast(url: String) -> ShipperOptions {
    ShipperOptions {
        batch_size: 10,
        flush_interval: Duration::from_millis(30),
        request_timeout: Duration::from_secs(3),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..ShipperOptions::new(url)
    }
}

fn start_shipper(store: &StoreHandle, options: ShipperOptions) -> ShipperHandle {
    let (handle, task) = Shipper::start(store, options).expect("start shipper");
    tokio::spawn(task.run());
    handle
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn push_n(store: &StoreHandle, from: u64, n: u64) {
    for i in from..from + n {
        assert!(store.push(json!({"i": i, "request": "GET /"})));
    }
}

#[tokio::test]
async fn records_reach_the_collector_in_order_once_in_ndjson_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let collector = Collector::plain().await;
    let store = start_store(store_options(dir.path(), 1 << 20, 4));
    let shipper = start_shipper(
        &store,
        ShipperOptions {
            headers: vec![("Authorization".into(), "Bearer t0ken".into())],
            ..fast(collector.url("http"))
        },
    );
    push_n(&store, 0, 25);
    wait_for("25 records", || collector.seqs().len() >= 25).await;
    // Nothing more arrives: each record once.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(collector.seqs(), (1..=25).collect::<Vec<_>>());
    {
        let seen = collector.seen.lock().expect("lock");
        assert!(seen.requests.len() >= 3);
        for (headers, n) in &seen.requests {
            assert!(*n >= 1 && *n <= 10, "batch of {n}");
            assert_eq!(headers["content-type"], BATCH_CONTENT_TYPE);
            assert_eq!(headers["authorization"], "Bearer t0ken");
        }
        let is: Vec<u64> = seen
            .records
            .iter()
            .map(|r| r["i"].as_u64().expect("i"))
            .collect();
        assert_eq!(is, (0..25).collect::<Vec<_>>());
    }
    assert_eq!(store.metrics().shipped.get(), 25);
    shipper.shutdown().await;
    store.shutdown().await;

    // The cursor on disk is the end of what was stored.
    let len = std::fs::metadata(&list_segments(dir.path()).expect("list")[0].1)
        .expect("stat")
        .len();
    let cursor: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(CURSOR_FILE)).expect("cursor file"))
            .expect("cursor json");
    assert_eq!(cursor, json!({"segment": 1, "offset": len}));
    assert_eq!(
        shipper.position(),
        Position {
            segment: 1,
            offset: len
        }
    );
}

#[tokio::test]
async fn records_written_while_the_collector_is_down_arrive_in_order_once_when_it_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nobody listens on, until the collector takes it.
    let reserved = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let store = start_store(store_options(dir.path(), 2048, 1000));
    let shipper = start_shipper(&store, fast(format!("http://{addr}/ingest")));
    push_n(&store, 0, 30);
    let metrics = store.metrics().clone();
    wait_for("connection retries", || metrics.retried("connect") >= 3).await;
    push_n(&store, 30, 45);
    assert_eq!(metrics.shipped.get(), 0);

    let listener = TcpListener::bind(addr).await.expect("rebind the port");
    let collector = Collector::start(listener, None).await;
    wait_for("75 records", || collector.seqs().len() >= 75).await;
    push_n(&store, 75, 5);
    wait_for("80 records", || collector.seqs().len() >= 80).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(collector.seqs(), (1..=80).collect::<Vec<_>>());
    assert_eq!(metrics.shipped.get(), 80);
    // The outage spanned several segments, all shipped.
    assert!(shipper.position().segment > 1);
    shipper.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn a_refused_batch_is_sent_again_until_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let collector = Collector::plain().await;
    collector
        .script
        .lock()
        .expect("lock")
        .extend([500, 503, 429]);
    let store = start_store(store_options(dir.path(), 1 << 20, 4));
    let shipper = start_shipper(&store, fast(collector.url("http")));
    push_n(&store, 0, 7);
    wait_for("7 records", || collector.seqs().len() >= 7).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(collector.seqs(), (1..=7).collect::<Vec<_>>());
    assert_eq!(store.metrics().retried("status"), 3);
    let requests = collector.seen.lock().expect("lock").requests.len();
    assert_eq!(requests, 4, "three refusals and one acknowledgement");
    shipper.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn a_restarted_shipper_goes_on_from_its_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let collector = Collector::plain().await;
    let store = start_store(store_options(dir.path(), 600, 1000));
    let shipper = start_shipper(&store, fast(collector.url("http")));
    push_n(&store, 0, 12);
    wait_for("12 records", || collector.seqs().len() >= 12).await;
    shipper.shutdown().await;

    // Stored while no shipper runs, across rotations.
    push_n(&store, 12, 20);
    wait_for("32 stored", || store.metrics().stored.get() >= 32).await;
    store.shutdown().await;
    assert!(list_segments(dir.path()).expect("list").len() > 2);

    let store = start_store(store_options(dir.path(), 600, 1000));
    let shipper = start_shipper(&store, fast(collector.url("http")));
    push_n(&store, 32, 3);
    wait_for("35 records", || collector.seqs().len() >= 35).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(collector.seqs(), (1..=35).collect::<Vec<_>>());
    assert_eq!(store.metrics().shipped.get(), 23);
    shipper.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn segments_deleted_before_shipping_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reserved = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let store = start_store(store_options(dir.path(), 500, 2));
    let shipper = start_shipper(&store, fast(format!("http://{addr}/ingest")));
    let metrics = store.metrics().clone();
    // The first batch is held for retry while the rest piles up.
    push_n(&store, 0, 1);
    wait_for("the shipper to try", || metrics.retried("connect") >= 1).await;
    push_n(&store, 1, 59);
    wait_for("60 stored", || metrics.stored.get() >= 60).await;
    let dropped = metrics.dropped("retention");
    assert!(dropped > 0);

    let listener = TcpListener::bind(addr).await.expect("rebind the port");
    let collector = Collector::start(listener, None).await;
    wait_for("the last record", || collector.seqs().last() == Some(&60)).await;
    let seqs = collector.seqs();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // The batch held for retry may come from a deleted segment: it is both
    // counted and sent. Nothing else is lost without being counted.
    assert!(
        seqs.len() as u64 + dropped >= 60,
        "{seqs:?}, {dropped} dropped"
    );
    shipper.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn bad_options_and_a_bad_cursor_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _task) = Store::open(store_options(dir.path(), 1 << 20, 4)).expect("open");
    let refuse = |options: ShipperOptions, expected: &str| match Shipper::start(&store, options) {
        Err(e) => assert!(e.to_string().contains(expected), "{e} lacks {expected:?}"),
        Ok(_) => panic!("accepted, expected {expected:?}"),
    };
    refuse(ShipperOptions::new("not a url"), "option url");
    refuse(
        ShipperOptions::new("ftp://127.0.0.1/x"),
        "not http or https",
    );
    refuse(ShipperOptions::new("/relative"), "option url");
    refuse(
        ShipperOptions {
            batch_size: 0,
            ..ShipperOptions::new("http://127.0.0.1:1/")
        },
        "batch_size",
    );
    refuse(
        ShipperOptions {
            backoff_max: Duration::from_millis(1),
            ..ShipperOptions::new("http://127.0.0.1:1/")
        },
        "backoff_max",
    );
    refuse(
        ShipperOptions {
            tls: ShipperTls {
                insecure_skip_verify: true,
                ..ShipperTls::default()
            },
            ..ShipperOptions::new("http://127.0.0.1:1/")
        },
        "https",
    );
    refuse(
        ShipperOptions {
            tls: ShipperTls {
                client_cert: Some(dir.path().join("c.pem")),
                ..ShipperTls::default()
            },
            ..ShipperOptions::new("https://127.0.0.1:1/")
        },
        "client_key",
    );
    refuse(
        ShipperOptions {
            tls: ShipperTls {
                ca_cert: Some(dir.path().join("missing-ca.pem")),
                ..ShipperTls::default()
            },
            ..ShipperOptions::new("https://127.0.0.1:1/")
        },
        "missing-ca.pem",
    );
    refuse(
        ShipperOptions {
            headers: vec![("Bad Header".into(), "x".into())],
            ..ShipperOptions::new("http://127.0.0.1:1/")
        },
        "headers",
    );
    refuse(
        ShipperOptions {
            headers: vec![("X-Ok".into(), "line\nbreak".into())],
            ..ShipperOptions::new("http://127.0.0.1:1/")
        },
        "headers",
    );
    std::fs::write(dir.path().join(CURSOR_FILE), b"{\"segment\":").expect("write");
    match Shipper::start(&store, ShipperOptions::new("http://127.0.0.1:1/")) {
        Err(e @ ShipperError::Cursor { .. }) => {
            assert!(e.to_string().contains(CURSOR_FILE), "{e}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a corrupt cursor accepted"),
    }
}

#[test]
fn backoff_doubles_within_bounds_with_jitter() {
    let min = Duration::from_millis(100);
    let max = Duration::from_secs(5);
    let mut last_low = Duration::ZERO;
    for attempt in 0..80 {
        let step = (min * 2u32.saturating_pow(attempt.min(20))).min(max);
        let low = backoff_delay(min, max, attempt, 0);
        let high = backoff_delay(min, max, attempt, u64::MAX);
        assert_eq!(low, step / 2, "attempt {attempt}");
        assert!(high <= step && high >= low, "attempt {attempt}: {high:?}");
        assert!(low >= last_low);
        last_low = low;
        for r in [1, 12345, 1 << 40] {
            let d = backoff_delay(min, max, attempt, r);
            assert!(d >= step / 2 && d <= step);
        }
    }
    assert_eq!(backoff_delay(min, max, 79, 0), max / 2);
    // Different draws spread the waits.
    let draws: std::collections::HashSet<Duration> = (0..20u64)
        .map(|r| backoff_delay(min, max, 3, r.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect();
    assert!(draws.len() > 10);
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: std::path::PathBuf,
}

fn issued(
    cert: &rcgen::Certificate,
    key: &KeyPair,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        Self { ca, ca_file }
    }

    fn issue(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let cert_file = dir.join(format!("{stem}.pem"));
        let key_file = dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        let (der, key) = issued(&cert, &key);
        (der, key, cert_file, key_file)
    }

    fn server_config(&self, dir: &Path, client_auth: bool) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, key, _, _) = self.issue(
            dir,
            "server",
            &["127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.der().clone()).expect("root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(
            builder
                .with_single_cert(vec![cert], key)
                .expect("server cert"),
        )
    }
}

async fn tls_collector(config: Arc<rustls::ServerConfig>) -> Collector {
    Collector::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Some(config),
    )
    .await
}

#[tokio::test]
async fn ships_over_mutual_tls_with_the_configured_ca_and_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "collector");
    let collector = tls_collector(pki.server_config(dir.path(), true)).await;
    let (_, _, cert_file, key_file) = pki.issue(
        dir.path(),
        "client",
        &["sentinel"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let store_dir = dir.path().join("store");
    let store = start_store(store_options(&store_dir, 1 << 20, 4));
    let shipper = start_shipper(
        &store,
        ShipperOptions {
            tls: ShipperTls {
                ca_cert: Some(pki.ca_file.clone()),
                client_cert: Some(cert_file),
                client_key: Some(key_file),
                insecure_skip_verify: false,
            },
            ..fast(collector.url("https"))
        },
    );
    push_n(&store, 0, 5);
    wait_for("5 records over mTLS", || collector.seqs().len() >= 5).await;
    assert_eq!(collector.seqs(), [1, 2, 3, 4, 5]);
    shipper.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn an_unknown_certificate_is_refused_unless_verification_is_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "unknown");
    let other = Pki::new(dir.path(), "other");
    let collector = tls_collector(pki.server_config(dir.path(), false)).await;

    // Verified against another CA: never acknowledged.
    let store_dir = dir.path().join("store");
    let store = start_store(store_options(&store_dir, 1 << 20, 4));
    let shipper = start_shipper(
        &store,
        ShipperOptions {
            tls: ShipperTls {
                ca_cert: Some(other.ca_file.clone()),
                ..ShipperTls::default()
            },
            ..fast(collector.url("https"))
        },
    );
    push_n(&store, 0, 3);
    let metrics = store.metrics().clone();
    wait_for("refused handshakes", || metrics.retried("connect") >= 2).await;
    assert!(collector.seqs().is_empty());
    assert_eq!(metrics.shipped.get(), 0);
    shipper.shutdown().await;

    // Same records, verification skipped: shipped.
    let shipper = start_shipper(
        &store,
        ShipperOptions {
            tls: ShipperTls {
                insecure_skip_verify: true,
                ..ShipperTls::default()
            },
            ..fast(collector.url("https"))
        },
    );
    wait_for("3 records", || collector.seqs().len() >= 3).await;
    assert_eq!(collector.seqs(), [1, 2, 3]);
    shipper.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn a_collector_that_never_answers_times_out_and_shutdown_still_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accepts connections and reads nothing, answers nothing.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let store = start_store(store_options(dir.path(), 1 << 20, 4));
    let shipper = start_shipper(
        &store,
        ShipperOptions {
            request_timeout: Duration::from_millis(150),
            ..fast(format!("http://{addr}/ingest"))
        },
    );
    push_n(&store, 0, 2);
    let metrics = store.metrics().clone();
    wait_for("timeouts", || metrics.retried("timeout") >= 2).await;
    assert_eq!(metrics.shipped.get(), 0);
    let started = Instant::now();
    shipper.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // Nothing was acknowledged: the cursor is where it started.
    assert_eq!(
        shipper.position(),
        Position {
            segment: 1,
            offset: 0
        }
    );
    store.shutdown().await;
    holder.abort();
}

#[tokio::test]
async fn garbage_lines_in_a_segment_are_skipped_and_counted_not_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    // What a power loss can leave: zeroed blocks and torn text between
    // good lines.
    std::fs::write(
        dir.path().join(super::store::segment_name(1)),
        b"{\"seq\":1,\"record_id\":\"a\"}\n\0\0\0\0\0\0\n[1,2]\n{\"seq\":2,\"record_id\":\"b\"}\n{\"seq\":3,\"rec\n",
    )
    .expect("write");
    std::fs::write(dir.path().join(super::store::segment_name(2)), b"\0\0\0\n").expect("write");
    let collector = Collector::plain().await;
    let store = start_store(store_options(dir.path(), 1 << 20, 10));
    let shipper = start_shipper(&store, fast(collector.url("http")));
    push_n(&store, 0, 1);
    wait_for("the new record", || collector.seqs().contains(&3)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(collector.seqs(), [1, 2, 3]);
    assert_eq!(store.metrics().dropped("corrupt"), 4);
    shipper.shutdown().await;
    store.shutdown().await;
}
