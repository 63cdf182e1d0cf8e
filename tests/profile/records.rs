//! Request metadata records through the binary: what each mode records,
//! every field of the schema (docs/profile.md), redaction, and uploads
//! hashed as they stream.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use sentinel_tests::http::{Chunks, Upstream, body, fetch, get, request, send_on};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::*;

/// One listener, one upstream, a route per mode, records stored in `store`.
fn blocks(app: &Upstream, store: &Path, metadata: &str) -> String {
    let route = |name: &str| {
        format!(
            "    route \"{name}\" {{\n        matches {{ path-prefix \"/{name}/\"; }}\n        upstream \"app\"\n        profile {{ mode \"{name}\"; }}\n        policies {{ max-body-bytes 0; timeout-secs 600; }}\n    }}\n"
        )
    };
    format!(
        "listeners {{\n    listener \"http\" {{\n        address \"127.0.0.1:0\"\n    }}\n}}\n\
         routes {{\n{}{}{}{}}}\n\
         upstreams {{\n    upstream \"app\" {{\n        targets {{\n            target {{ address \"{}\"; }}\n        }}\n    }}\n}}\n\
         profile {{\n    metadata {{\n        agent-id \"edge-test\"\n        {metadata}\n    }}\n    store {{\n        path \"{}\"\n    }}\n}}\n",
        route("off"),
        route("lite"),
        route("monitor"),
        route("protection"),
        app.target(),
        store.display(),
    )
}

/// Every record in the store's segments, oldest first; each line must be
/// a JSON object.
pub fn stored(dir: &Path) -> Vec<Value> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    segments.sort();
    let mut records = Vec::new();
    for segment in segments {
        let text = std::fs::read_to_string(&segment)
            .unwrap_or_else(|e| panic!("{}: {e}", segment.display()));
        for (n, line) in text.lines().enumerate() {
            let record: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{}:{}: not JSON ({e}): {line}", segment.display(), n + 1)
            });
            assert!(record.is_object(), "{}:{}", segment.display(), n + 1);
            records.push(record);
        }
    }
    records
}

/// Waits until the daemon reports `n` records stored.
pub async fn until_stored(d: &Daemon, n: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stored = metric(d, "sentinel_profile_records_stored_total", &[]);
        if stored >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{stored} of {n} records stored:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const CHROME_ANDROID: &str = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.6478.71 Mobile Safari/537.36";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mode_records_what_it_should_with_every_field_redacted() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let records = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = start(&blocks(&app, records.path(), ""));
    let addr = d.listener("http");
    let headers = [
        ("user-agent", CHROME_ANDROID),
        ("content-type", "application/json"),
        ("referer", "https://shop.example/cart"),
        ("authorization", "Bearer very-secret"),
        ("cookie", "session=abc"),
    ];
    let json = r#"{"user":"ann","password":"hunter2","items":[{"token":"t1"}]}"#;
    for mode in ["off", "lite", "monitor", "protection"] {
        let reply = fetch(
            addr,
            "POST",
            &format!("/{mode}/login?next=%2Fhome&token=xyz"),
            &headers,
            body(json),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{mode}");
    }
    until_stored(&d, 3.0).await;
    let all = stored(records.path());
    let modes: Vec<&str> = all.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(modes.len(), 3, "off records nothing: {all:#?}");
    for mode in ["lite", "monitor", "protection"] {
        assert!(modes.contains(&mode), "{mode} recorded: {modes:?}");
    }

    for record in &all {
        let mode = record["mode"].as_str().unwrap_or_default();
        assert_eq!(record["agent_id"], "edge-test");
        assert_eq!(record["agent_name"], "sentinel");
        assert!(record["seq"].as_u64().is_some(), "{record}");
        assert!(record["record_id"].as_str().is_some(), "{record}");
        let client = &record["client"];
        assert_eq!(client["ip"], "127.0.0.1");
        assert_eq!(client["device_type"], "mobile", "{client}");
        assert_eq!(client["platform"], "Android", "{client}");
        assert_eq!(client["browser"], "Chrome", "{client}");
        assert_eq!(client["browser_version"], "126.0.6478.71", "{client}");
        assert_eq!(client["network_type"], "loopback", "{client}");

        let request = &record["request"];
        assert_eq!(request["method"], "POST");
        assert_eq!(request["scheme"], "http");
        assert_eq!(request["host"], "test.local");
        assert_eq!(request["endpoint"], format!("/{mode}/login"));
        assert_eq!(
            request["url"],
            format!("http://test.local/{mode}/login?next=%2Fhome&token=[redacted]")
        );
        assert_eq!(request["query_parameters"]["next"], "/home");
        assert_eq!(request["query_parameters"]["token"], "[redacted]");
        let h = &request["headers"];
        assert_eq!(h["user-agent"], CHROME_ANDROID);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["content-length"], json.len().to_string());
        assert_eq!(h["referrer"], "https://shop.example/cart");
        assert_eq!(h["authorization"], "[redacted]");
        assert_eq!(h["cookie"], "[redacted]");
        let text = record.to_string();
        for secret in ["very-secret", "session=abc", "hunter2", "xyz", "\"t1\""] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }

        if mode == "lite" {
            // Lightweight: the body is not looked at.
            assert!(request.get("body").is_none(), "{request}");
            assert!(request.get("files").is_none(), "{request}");
        } else {
            let body: Value = serde_json::from_str(request["body"].as_str().unwrap_or("null"))
                .unwrap_or_else(|e| panic!("body is JSON text: {e}: {request}"));
            assert_eq!(body["user"], "ann");
            assert_eq!(body["password"], "[redacted]");
            assert_eq!(body["items"][0]["token"], "[redacted]");
            assert_eq!(request["body_size"], json.len());
            assert_eq!(request["files"], Value::Array(Vec::new()));
        }

        assert_eq!(record["response"]["status"], 200);
        let host = &record["host"];
        for field in [
            "ip_address",
            "pid",
            "run_as",
            "executable_path",
            "executable_name",
            "executable_version",
            "process_name",
            "process_path",
            "process_command",
            "platform",
            "cpu_usage",
            "memory_usage",
            "architecture",
            "os_name",
            "os_version",
            "os_build",
        ] {
            assert!(host.get(field).is_some(), "host.{field} missing: {host}");
        }
        assert_eq!(host["pid"], u64::from(d.pid().unwrap_or_default()));
        assert_eq!(host["run_as"], "root");
        assert_eq!(host["executable_name"], "sentinel");
        assert_eq!(host["platform"], "linux");
        let created = record["request_created_at"].as_str().unwrap_or_default();
        assert!(
            created.len() == 24 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
            "UTC ISO 8601 with milliseconds: {created}"
        );
    }
    // Nothing queued or dropped along the way.
    assert_eq!(
        metric(
            &d,
            "sentinel_profile_records_dropped_total",
            &[("reason", "queue_full")]
        ),
        0.0
    );
    assert_eq!(get(addr, "/off/again").await.status, StatusCode::OK);
}

/// A multipart body: three files, the last `big` bytes long (a 1 MiB
/// pseudo-random block repeated, behind an ELF magic), each with its
/// expected SHA-256.
struct Upload {
    boundary: &'static str,
    chunks: Vec<Bytes>,
    len: u64,
    /// (field name, file name, size, sha256 hex)
    files: Vec<(&'static str, &'static str, u64, String)>,
}

fn upload(big: u64) -> Upload {
    let boundary = "sentinel-test-boundary-7d3f";
    let mut chunks = Vec::new();
    let mut files = Vec::new();
    let mut part = |name: &'static str, file: &'static str, claimed: &str, content: Vec<Bytes>| {
        chunks.push(Bytes::from(format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\ncontent-type: {claimed}\r\n\r\n"
        )));
        let mut hash = Sha256::new();
        let mut size = 0;
        for c in &content {
            hash.update(c);
            size += c.len() as u64;
        }
        chunks.extend(content);
        chunks.push(Bytes::from_static(b"\r\n"));
        files.push((name, file, size, hex(&hash.finalize())));
    };
    part(
        "notes",
        "notes.txt",
        "text/plain",
        vec![Bytes::from_static(b"plain words, nothing else\n")],
    );
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&[7u8; 300]);
    // Claimed to be text: the type recorded comes from its bytes.
    part("avatar", "avatar.txt", "text/plain", vec![Bytes::from(png)]);
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    block[..4].copy_from_slice(b"\x7fELF");
    let first = Bytes::from(block.clone());
    block[..4].copy_from_slice(&[1, 2, 3, 4]);
    let block = Bytes::from(block);
    let mut content = vec![first];
    let mut left = big - (1 << 20);
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        content.push(block.slice(..n));
        left -= n as u64;
    }
    part("binary", "tool", "application/octet-stream", content);
    chunks.push(Bytes::from(format!("--{boundary}--\r\n")));
    let len = chunks.iter().map(|c| c.len() as u64).sum();
    Upload {
        boundary,
        chunks,
        len,
        files,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Peak resident memory of `pid` (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_hashed_and_typed_as_they_stream_in_bounded_memory() {
    if skip() {
        return;
    }
    const BIG: u64 = 500 << 20;
    let app = Upstream::start("app").await;
    let records = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = start(&blocks(&app, records.path(), "file-content-bytes 16"));
    let addr = d.listener("http");
    let pid = d.pid().unwrap_or_default();
    // Warm up (connections, the first record) before the baseline.
    assert_eq!(get(addr, "/monitor/warm").await.status, StatusCode::OK);
    until_stored(&d, 1.0).await;
    let before = peak_rss_kib(pid);

    let up = upload(BIG);
    let content_type = format!("multipart/form-data; boundary={}", up.boundary);
    let req = request(
        "POST",
        "/monitor/upload",
        &[("content-type", content_type.as_str())],
        Chunks::sized(up.len, up.chunks.clone().into_iter()).boxed(),
        false,
    );
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        send_on(stream, false, req).await
    };
    let reply = tokio::time::timeout(Duration::from_secs(600), exchange)
        .await
        .unwrap_or_else(|_| panic!("the upload took over 10 minutes"))
        .unwrap_or_else(|e| panic!("upload: {e}"));
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(app.last().body_bytes, up.len, "the upstream got it all");
    until_stored(&d, 2.0).await;
    let after = peak_rss_kib(pid);

    let all = stored(records.path());
    let record = all
        .iter()
        .find(|r| r["request"]["endpoint"] == "/monitor/upload")
        .unwrap_or_else(|| panic!("no upload record: {all:#?}"));
    let files = record["request"]["files"]
        .as_array()
        .unwrap_or_else(|| panic!("files: {record}"));
    assert_eq!(files.len(), 3, "{files:#?}");
    let want_types = ["text/plain", "image/png", "application/x-elf"];
    for ((file, (_, name, size, hash)), want_type) in files.iter().zip(&up.files).zip(want_types) {
        assert_eq!(file["file_name"], *name, "{file}");
        assert_eq!(file["file_size"], *size, "{file}");
        assert_eq!(file["file_hash256"], hash.as_str(), "{file}");
        assert_eq!(file["file_type"], want_type, "{file}");
        assert!(
            file["file_content"].as_str().is_some_and(|c| c.len() <= 24),
            "16 bytes at most, base64: {file}"
        );
    }
    assert_eq!(files[0]["file_content"], "cGxhaW4gd29yZHMsIG5vdA==");
    assert_eq!(record["request"]["body_size"], up.len);
    // 500 MiB went through; the daemon's peak grew by far less.
    let grown = after.saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "peak RSS grew by {grown} KiB (from {before} KiB) for a {} MiB upload",
        BIG >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_agents_get_the_record_in_request_complete_without_a_store() {
    if skip() {
        return;
    }
    use sentinel_agent_protocol::{Event, EventType};
    use sentinel_tests::agent::{allow_all, until};

    let app = Upstream::start("app").await;
    let log = ScriptAgent::unix(true, allow_all()).await;
    let text = format!(
        "listeners {{\n    listener \"http\" {{\n        address \"127.0.0.1:0\"\n    }}\n}}\n\
         routes {{\n    route \"app\" {{\n        upstream \"app\"\n        filters \"log\"\n        profile {{ mode \"monitor\"; }}\n    }}\n}}\n\
         upstreams {{\n    upstream \"app\" {{\n        targets {{\n            target {{ address \"{}\"; }}\n        }}\n    }}\n}}\n\
         agents {{\n    agent \"log\" type=\"custom\" {{\n        {}\n        events \"log\"\n    }}\n}}\n\
         filters {{\n    filter \"log\" {{ type \"agent\"; agent \"log\"; }}\n}}\n",
        app.target(),
        unix(&log),
    );
    let d = start(&text);
    let reply = fetch(
        d.listener("http"),
        "POST",
        "/form?password=p1",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("cookie", "id=42"),
        ],
        body("user=ann&password=hunter2"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    until(Duration::from_secs(5), "request_complete", || {
        !log.events(EventType::RequestComplete).is_empty()
    })
    .await;
    let Some(Event::RequestComplete(done)) =
        log.events(EventType::RequestComplete).into_iter().next()
    else {
        panic!("no request_complete");
    };
    let record = done
        .record
        .clone()
        .unwrap_or_else(|| panic!("no record: {done:?}"));
    assert_eq!(record["mode"], "monitor");
    assert_eq!(record["route"], "app");
    assert_eq!(record["request"]["body"], "user=ann&password=[redacted]");
    assert_eq!(
        record["request"]["query_parameters"]["password"],
        "[redacted]"
    );
    assert_eq!(record["request"]["headers"]["cookie"], "[redacted]");
    assert!(!record.to_string().contains("hunter2"));
    assert!(!record.to_string().contains("p1"));
    assert!(record["host"]["pid"].as_u64().is_some(), "{record}");
}
