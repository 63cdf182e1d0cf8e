//! SIGHUP reloads the configuration: a valid file re-applies static entries
//! and TTL limits without touching entries added at run time; an invalid
//! one is logged and changes nothing.

use std::{
    fs,
    thread::sleep,
    time::{Duration, Instant},
};

use sentinel_tests::{
    self as support,
    daemon::{Daemon, DaemonConfig},
};
use serde_json::Value;

fn prefixes(daemon: &Daemon) -> Vec<(String, String, String)> {
    let mut list: Vec<(String, String, String)> = daemon
        .deny_list()
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (field("prefix"), field("source"), field("reason"))
        })
        .collect();
    list.sort();
    list
}

fn hup(daemon: &Daemon) {
    let pid = daemon.pid().expect("daemon running") as i32;
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

/// Waits until `done` holds, or panics with the daemon's log.
fn eventually(daemon: &Daemon, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen; daemon log:\n{}",
            daemon.log()
        );
        sleep(Duration::from_millis(100));
    }
}

#[test]
fn sighup_applies_a_valid_file_and_ignores_an_invalid_one() {
    if support::skip_unless_root("needs root (a running daemon loads BPF)") {
        return;
    }
    let daemon = Daemon::start(DaemonConfig::default().with_kernel(
        "max-ttl-seconds 3600\ndenylist {\n    prefix \"192.0.2.0/24\" reason=\"first\"\n}",
    ));
    daemon.cli_ok(&["deny", "add", "203.0.113.7", "--reason", "runtime"]);
    assert_eq!(
        prefixes(&daemon),
        [
            ("192.0.2.0/24".into(), "config".into(), "first".into()),
            ("203.0.113.7/32".into(), "admin".into(), "runtime".into()),
        ]
    );
    // Above the configured maximum: refused.
    assert!(
        !daemon
            .cli(&["deny", "add", "198.51.100.9", "--ttl", "2h"])
            .status
            .success()
    );

    // A valid file: the static entry is replaced, the limit raised, the
    // runtime entry kept.
    let text = fs::read_to_string(&daemon.config_path).unwrap();
    let valid = text
        .replace(
            "prefix \"192.0.2.0/24\" reason=\"first\"",
            "prefix \"198.51.100.0/24\" reason=\"second\"",
        )
        .replace("max-ttl-seconds 3600", "max-ttl-seconds 86400");
    assert_ne!(text, valid);
    fs::write(&daemon.config_path, &valid).unwrap();
    hup(&daemon);
    let want = vec![
        (
            "198.51.100.0/24".to_owned(),
            "config".to_owned(),
            "second".to_owned(),
        ),
        (
            "203.0.113.7/32".to_owned(),
            "admin".to_owned(),
            "runtime".to_owned(),
        ),
    ];
    eventually(&daemon, "the reload", || prefixes(&daemon) == want);
    daemon.cli_ok(&["deny", "add", "198.51.100.9", "--ttl", "2h"]);
    let removed = daemon.metric_value(
        "sentinel_denylist_updates_total",
        &[("source", "config"), ("result", "removed")],
    );
    assert_eq!(removed, Some(1.0));

    // An invalid file: logged, nothing changes, the daemon keeps serving.
    let before = prefixes(&daemon);
    fs::write(
        &daemon.config_path,
        valid.replace("max-ttl-seconds 86400", "max-ttl-seconds \"soon\""),
    )
    .unwrap();
    hup(&daemon);
    eventually(&daemon, "the refusal to be logged", || {
        daemon.log().contains("configuration not reloaded")
    });
    assert!(
        daemon
            .log()
            .contains("'max-ttl-seconds' must be an integer"),
        "{}",
        daemon.log()
    );
    assert_eq!(prefixes(&daemon), before);
    let status: Value = daemon.status();
    assert!(status["pid"].as_u64().is_some());
    // Still the old limit: a 2h TTL is accepted.
    daemon.cli_ok(&["deny", "add", "198.51.100.10", "--ttl", "2h"]);
}
