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
