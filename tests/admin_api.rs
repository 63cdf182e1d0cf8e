//! The admin socket under bad input: malformed, unknown and oversized
//! requests get an error answer, never a crash, and the daemon keeps
//! serving; the socket is created with mode 0600.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    time::Duration,
};

use sentinel_tests::{
    self as support,
    daemon::{Daemon, DaemonConfig},
};
use serde_json::Value;

fn ask(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &[u8]) -> Value {
    stream.write_all(line).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"))
}

#[test]
fn bad_requests_get_errors_and_the_daemon_keeps_serving() {
    if support::skip_unless_root("needs root (a running daemon loads BPF)") {
        return;
    }
    let daemon = Daemon::start(DaemonConfig::default());
    let mode = std::fs::metadata(&daemon.admin_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    let mut stream = UnixStream::connect(&daemon.admin_socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for (line, needle) in [
        (&b"not json"[..], "bad request"),
        (br#"{"op":"explode"}"#, "bad request"),
        (br#"{"op":"add","list":"deny"}"#, "bad request"),
        (
            br#"{"op":"add","list":"deny","prefix":"banana"}"#,
            "not a CIDR",
        ),
        (
            br#"{"op":"add","list":"deny","prefix":"0.0.0.0/0"}"#,
            "refusing to deny",
        ),
        (
            br#"{"op":"add","list":"deny","prefix":"192.0.2.0/24","ttl_ms":0}"#,
            "out of range",
        ),
        (
            br#"{"op":"import","list":"deny","prefixes":["192.0.2.1","nope"]}"#,
            "entry 2",
        ),
        (&[0xff, 0xfe, b'{'][..], "bad request"),
    ] {
        let answer = ask(&mut stream, &mut reader, line);
        assert_eq!(answer["ok"], false, "{answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle),
            "{:?}: {error}",
            String::from_utf8_lossy(line)
        );
    }
    // The same connection still works, and nothing was written.
    let answer = ask(&mut stream, &mut reader, br#"{"op":"list","list":"deny"}"#);
    assert_eq!(answer, serde_json::json!({"ok": true, "result": []}));

    // An oversized line is refused and its connection closed.
    let mut big = UnixStream::connect(&daemon.admin_socket).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut big_reader = BufReader::new(big.try_clone().unwrap());
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..17 {
        if big.write_all(&chunk).is_err() {
            break; // The daemon may close before reading it all.
        }
    }
    let mut answer = String::new();
    let _ = big_reader.read_line(&mut answer);
    assert!(answer.contains("request larger than"), "{answer:?}");

    // Other clients are served throughout.
    let status = daemon.status();
    assert!(status["pid"].as_u64().is_some(), "{status}");
    daemon.cli_ok(&["deny", "add", "192.0.2.7"]);
    assert_eq!(daemon.deny_list().len(), 1);
}

/// `import_packed`: offered in `status`, its request line checked before
/// the body is asked for, a bad record refusing the whole body, and a good
/// body written with its TTL and reason; `deny import` uses it.
#[test]
fn packed_imports_are_checked_whole_before_anything_is_written() {
    if support::skip_unless_root("needs root (a running daemon loads BPF)") {
        return;
    }
    let daemon = Daemon::start(DaemonConfig::default());
    let status = daemon.status();
    assert!(
        status["features"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "import_packed")),
        "{status}"
    );
    let mut stream = UnixStream::connect(&daemon.admin_socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());

    // Refused on the request line: no body follows, the connection stays.
    let answer = ask(
        &mut stream,
        &mut reader,
        br#"{"op":"import_packed","list":"deny","v4":1,"v6":0,"ttl_ms":0}"#,
    );
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("out of range"));

    let header =
        br#"{"op":"import_packed","list":"deny","v4":2,"v6":1,"ttl_ms":600000,"reason":"feed"}"#;
    let good_v4 = [192, 0, 2, 7, 32, 198, 51, 100, 0, 24];
    let v6: Vec<u8> = "2001:db8:1::"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .into_iter()
        .chain([48])
        .collect();

    // The second record has host bits set: nothing is written.
    let answer = ask(&mut stream, &mut reader, header);
    assert_eq!(
        answer,
        serde_json::json!({"ok": true, "result": {"body_bytes": 27}})
    );
    let mut bad = good_v4.to_vec();
    bad[8] = 9;
    bad.extend(&v6);
    stream.write_all(&bad).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let answer: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.starts_with("entry 2: 198.51.100.9/24 has host bits set"),
        "{error}"
    );
    assert_eq!(daemon.deny_list().len(), 0);

    // The same body without the mistake.
    ask(&mut stream, &mut reader, header);
    let mut body = good_v4.to_vec();
    body.extend(&v6);
    stream.write_all(&body).unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    let answer: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"ok": true, "result": {"created": 3, "replaced": 0}})
    );
    let entries = daemon.deny_list();
    let mut prefixes: Vec<&str> = entries
        .iter()
        .map(|e| e["prefix"].as_str().unwrap())
        .collect();
    prefixes.sort_unstable();
    assert_eq!(
        prefixes,
        ["192.0.2.7/32", "198.51.100.0/24", "2001:db8:1::/48"]
    );
    for entry in &entries {
        assert_eq!(entry["reason"], "feed", "{entry}");
        assert_eq!(entry["source"], "admin", "{entry}");
        assert!(entry["ttl_remaining_seconds"].as_f64().unwrap() > 500.0);
    }

    // `deny import` goes the same way, with the file's line numbers.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("list.txt");
    std::fs::write(&file, "# feed\n203.0.113.0/24\n\n2001:db8:2::1\n").unwrap();
    let out = daemon.cli_ok(&["deny", "import", file.to_str().unwrap()]);
    assert!(out.contains("2 added, 0 replaced"), "{out}");
    assert_eq!(daemon.deny_list().len(), 5);
    std::fs::write(&file, "203.0.113.0/24\n203.0.113.1/24\n").unwrap();
    let out = daemon.cli(&["deny", "import", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("list.txt:2: 203.0.113.1/24 has host bits set"),
        "{stderr}"
    );
    assert_eq!(daemon.deny_list().len(), 5);
}
