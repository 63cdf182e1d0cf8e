//! The local store and the collector through the binary: rotation and
//! retention, store-and-forward across a collector outage and a restart,
//! and a crash (kill -9) in the middle of writes.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{rt::TokioIo, server::conn::auto};
use sentinel_tests::http::{Upstream, get};
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    records::{stored, until_stored},
    *,
};

fn blocks(app: &Upstream, store: &Path, store_extra: &str, collector: &str) -> String {
    format!(
        "listeners {{\n    listener \"http\" {{\n        address \"127.0.0.1:0\"\n    }}\n}}\n\
         routes {{\n    route \"all\" {{\n        upstream \"app\"\n    }}\n}}\n\
         upstreams {{\n    upstream \"app\" {{\n        targets {{\n            target {{ address \"{}\"; }}\n        }}\n    }}\n}}\n\
         profile {{\n    mode \"lite\"\n    store {{\n        path \"{}\"\n        {store_extra}\n    }}\n    {collector}\n}}\n",
        app.target(),
        store.display(),
    )
}

fn seqs(records: &[Value]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {r}")))
        .collect()
}

fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".jsonl"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_rotate_by_size_and_the_oldest_go() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = start(&blocks(
        &app,
        dir.path(),
        "max-file-bytes 4096\n        max-files 3",
        "",
    ));
    let addr = d.listener("http");
    for i in 0..120 {
        assert_eq!(get(addr, &format!("/r/{i}")).await.status, StatusCode::OK);
    }
    until_stored(&d, 120.0).await;
    let names = segments(dir.path());
    assert_eq!(names.len(), 3, "max-files 3: {names:?}");
    for name in &names {
        let size = std::fs::metadata(dir.path().join(name))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(size <= 4096, "{name}: {size} bytes");
    }
    // What is kept is the newest, whole and in order: the last seq is the
    // 120th record, and they follow each other without a gap.
    let kept = seqs(&stored(dir.path()));
    assert_eq!(kept.last(), Some(&120), "{kept:?}");
    assert!(kept.windows(2).all(|w| w[1] == w[0] + 1), "{kept:?}");
    assert!(kept.len() < 120, "the oldest segments were deleted");
    assert_eq!(
        metric(&d, "sentinel_profile_segments", &[]),
        3.0,
        "{}",
        d.metrics()
    );
}

/// A collector that answers `status` (0: not listening at all) and keeps
/// every record it acknowledged.
struct Collector {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    received: Arc<Mutex<Vec<Value>>>,
    batches: Arc<Mutex<u64>>,
    accept: Option<JoinHandle<()>>,
}

impl Collector {
    /// An address nothing listens on yet.
    async fn reserve() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        drop(listener);
        Self {
            addr,
            status: Arc::new(AtomicU16::new(200)),
            received: Arc::default(),
            batches: Arc::default(),
            accept: None,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }

    async fn listen(&mut self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("collector {}: {e}", self.addr));
        let (status, received, batches) = (
            self.status.clone(),
            self.received.clone(),
            self.batches.clone(),
        );
        self.accept = Some(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (status, received, batches) =
                    (status.clone(), received.clone(), batches.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (status, received, batches) =
                            (status.clone(), received.clone(), batches.clone());
                        async move {
                            let ndjson = req.headers().get("content-type").cloned();
                            let body = req.into_body().collect().await?.to_bytes();
                            let code = status.load(Ordering::SeqCst);
                            if code == 200 {
                                assert_eq!(
                                    ndjson.as_ref().and_then(|v| v.to_str().ok()),
                                    Some("application/x-ndjson")
                                );
                                let text = String::from_utf8_lossy(&body).into_owned();
                                let mut got = received.lock().unwrap_or_else(|p| p.into_inner());
                                for line in text.lines().filter(|l| !l.is_empty()) {
                                    got.push(serde_json::from_str(line).unwrap_or_else(|e| {
                                        panic!("collector got a bad line ({e}): {line}")
                                    }));
                                }
                                *batches.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                            }
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() =
                                StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }

    fn received(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

async fn send(addr: SocketAddr, from: usize, n: usize) {
    for i in from..from + n {
        assert_eq!(get(addr, &format!("/r/{i}")).await.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_wait_out_a_collector_outage_and_a_restart_then_arrive_once_in_order() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut collector = Collector::reserve().await;
    let collector_block = format!(
        "collector {{\n        url \"{}\"\n        batch-size 7\n        flush-interval-ms 50\n        backoff-min-ms 50\n        backoff-max-ms 200\n        timeout-ms 2000\n    }}",
        collector.url()
    );
    let mut d = start(&blocks(&app, dir.path(), "", &collector_block));

    // Down: nothing listens. Records are stored, the shipper retries.
    send(d.listener("http"), 0, 30).await;
    until_stored(&d, 30.0).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        &d,
        "sentinel_profile_batches_retried_total",
        &[("reason", "connect")],
    ) < 2.0
    {
        assert!(Instant::now() < deadline, "no retries:\n{}", d.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&d, "sentinel_profile_records_shipped_total", &[]),
        0.0
    );

    // A restart while it is still down: what was stored stays queued.
    assert!(d.stop().success(), "{}", d.log());
    d.restart();
    send(d.listener("http"), 30, 30).await;
    until_stored(&d, 30.0).await;

    // Up, but failing: answers 503, which is retried too.
    collector.listen(503).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        &d,
        "sentinel_profile_batches_retried_total",
        &[("reason", "status")],
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "no 503 retry:\n{}", d.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(collector.received().is_empty());

    // Back: everything arrives, in order, once.
    collector.status.store(200, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while collector.received().len() < 60 {
        assert!(
            Instant::now() < deadline,
            "{} of 60 records shipped:\n{}",
            collector.received().len(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send(d.listener("http"), 60, 5).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while collector.received().len() < 65 {
        assert!(Instant::now() < deadline, "live records not shipped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for a duplicate to show up, if one were coming.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = collector.received();
    let got_seqs = seqs(&got);
    assert_eq!(got_seqs, (1..=65).collect::<Vec<u64>>(), "in order, once");
    let ids: BTreeSet<&str> = got.iter().filter_map(|r| r["record_id"].as_str()).collect();
    assert_eq!(ids.len(), 65, "record ids are unique");
    let paths: Vec<&str> = got
        .iter()
        .filter_map(|r| r["request"]["endpoint"].as_str())
        .collect();
    let want: Vec<String> = (0..65).map(|i| format!("/r/{i}")).collect();
    assert_eq!(paths, want, "each request's own record");
    assert_eq!(
        metric(&d, "sentinel_profile_records_shipped_total", &[]),
        65.0
    );
    assert!(*collector.batches.lock().unwrap_or_else(|p| p.into_inner()) >= 65 / 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_write_loses_nothing_reported_stored_and_leaves_valid_json_lines() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut d = start(&blocks(&app, dir.path(), "max-file-bytes 65536", ""));
    let addr = d.listener("http");

    // Load from four clients until the crash.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<JoinHandle<()>> = (0..4)
        .map(|c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let path = format!("/load/{c}/{i}");
                    if sentinel_tests::http::try_fetch(
                        addr,
                        "GET",
                        &path,
                        &[],
                        sentinel_tests::http::empty(),
                    )
                    .await
                    .is_err()
                    {
                        return;
                    }
                    i += 1;
                }
            })
        })
        .collect();
    until_stored(&d, 300.0).await;
    let reported = metric(&d, "sentinel_profile_records_stored_total", &[]) as usize;
    d.kill9();
    stop.store(true, Ordering::SeqCst);
    for task in load {
        let _ = task.await;
    }

    // Every record reported stored is on disk; at most the last line of
    // the newest segment can be cut short.
    let mut whole = 0;
    let names = segments(dir.path());
    for (k, name) in names.iter().enumerate() {
        let text = std::fs::read(dir.path().join(name)).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for (n, line) in lines.iter().enumerate() {
            let last = k + 1 == names.len() && n + 1 == lines.len();
            match serde_json::from_str::<Value>(line.trim_end()) {
                Ok(v) if v.is_object() && line.ends_with('\n') => whole += 1,
                _ if last => {}
                _ => panic!("{name}:{}: a bad line before the end: {line}", n + 1),
            }
        }
    }
    assert!(
        whole >= reported,
        "{whole} whole records on disk, {reported} reported stored"
    );

    // A restart repairs the tail and numbering goes on from the last seq.
    d.restart();
    let addr = d.listener("http");
    send(addr, 0, 10).await;
    until_stored(&d, 10.0).await;
    let all = stored(dir.path());
    let s = seqs(&all);
    assert_eq!(s.len(), whole + 10, "nothing lost, nothing twice");
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "seq runs on: {s:?}");
    assert_eq!(
        all.last().map(|r| r["request"]["endpoint"].clone()),
        Some("/r/9".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_the_last_response_keeps_every_record() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // A long fsync interval: only the shutdown's flush and fsync count.
    let mut d = start(&blocks(&app, dir.path(), "fsync-interval-ms 60000", ""));
    send(d.listener("http"), 0, 200).await;
    assert!(d.stop().success(), "{}", d.log());
    let records = stored(dir.path());
    let paths: Vec<String> = records
        .iter()
        .filter_map(|r| r["request"]["endpoint"].as_str().map(str::to_owned))
        .collect();
    let want: Vec<String> = (0..200).map(|i| format!("/r/{i}")).collect();
    assert_eq!(paths, want, "every answered request's record, in order");
    assert!(d.log().contains("profile store closed"), "{}", d.log());
}
