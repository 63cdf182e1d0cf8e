//! The CLI's answers to bad input, through the real binary: a non-zero
//! exit, exactly one `error: ...` line on stderr, and no change to the
//! daemon's lists.
//!
//! The cases without a daemon (validation, an unreachable daemon, input
//! refused before any request) run as any user; those against a running
//! daemon need root (it loads the XDP program, attached to nothing).

use std::{path::Path, process::Command};

use sentinel_tests::{
    self as support,
    daemon::{self, Daemon, DaemonConfig},
};
use serde_json::Value;

/// A `sentinel` invocation with no usable daemon behind `--admin-socket`.
fn sentinel(admin_socket: &Path, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(daemon::bin());
    command
        .arg("--admin-socket")
        .arg(admin_socket)
        .args(args)
        .env_remove("SENTINEL_ADMIN_SOCKET");
    daemon::output(command)
}

/// Asserts exit status 1 and a single `error:` line containing `expected`.
fn assert_refused(out: &std::process::Output, args: &[&str], expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!("`sentinel {}`", args.join(" "));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{shown} should exit 1; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{shown} should print one line: {stderr:?}");
    assert!(
        lines[0].starts_with("error: "),
        "{shown} printed: {}",
        lines[0]
    );
    assert!(
        lines[0].contains(expected),
        "{shown}: expected {expected:?} in: {}",
        lines[0]
    );
    assert!(
        out.stdout.is_empty(),
        "{shown} printed on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Bad input the CLI refuses itself, with what its message must say.
fn client_side_cases() -> Vec<(Vec<String>, &'static str)> {
    let long_reason = "r".repeat(65);
    let case = |args: &[&str], expected| (args.iter().map(|a| a.to_string()).collect(), expected);
    vec![
        case(&["deny", "add", "banana"], "'banana' is not a CIDR prefix"),
        case(
            &["deny", "add", "300.1.1.1/8"],
            "'300.1.1.1/8' is not a CIDR prefix",
        ),
        case(&["allow", "add", "banana"], "'banana' is not a CIDR prefix"),
        case(
            &["deny", "remove", "banana"],
            "'banana' is not a CIDR prefix",
        ),
        case(
            &["deny", "add", "10.0.0.1/8"],
            "10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)",
        ),
        case(
            &["deny", "add", "0.0.0.0/0"],
            "it would drop all IPv4 traffic",
        ),
        case(&["deny", "add", "::/0"], "it would drop all IPv6 traffic"),
        case(
            &["deny", "add", "198.51.100.0/24", "--ttl", "0s"],
            "out of range",
        ),
        case(
            &["deny", "add", "198.51.100.0/24", "--ttl", "100y"],
            "out of range",
        ),
        case(
            &["deny", "add", "198.51.100.0/24", "--ttl", "soon"],
            "'soon' is not a duration",
        ),
        case(
            &["deny", "add", "198.51.100.0/24", "--reason", &long_reason],
            "reason is 65 bytes; at most 64 are stored",
        ),
        case(
            &[
                "deny",
                "add",
                "198.51.100.0/24",
                "--ttl",
                "1h",
                "--reason",
                &long_reason,
            ],
            "reason is 65 bytes; at most 64 are stored",
        ),
    ]
}

#[test]
fn unreachable_daemon_is_reported() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("absent.sock");
    for args in [
        &["deny", "list"][..],
        &["deny", "add", "198.51.100.0/24"],
        &["allow", "remove", "198.51.100.0/24"],
        &["stats", "--json"],
        &["status"],
    ] {
        let out = sentinel(&socket, args);
        assert_refused(&out, args, "cannot reach the sentinel daemon");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&socket.display().to_string()),
            "the message should name the socket: {stderr}"
        );
    }
}

/// Clients find the admin socket in `--config`, and `--admin-socket`
/// (or `SENTINEL_ADMIN_SOCKET`) overrides it.
#[test]
fn admin_socket_comes_from_the_config_unless_overridden() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let from_config = dir.path().join("from-config.sock");
    let from_flag = dir.path().join("from-flag.sock");
    let config = dir.path().join("sentinel.kdl");
    std::fs::write(
        &config,
        format!("admin {{\n    socket \"{}\"\n}}\n", from_config.display()),
    )
    .unwrap();
    let run = |extra: &[&str], env: Option<&Path>| {
        let mut cmd = Command::new(support::daemon::bin());
        cmd.arg("--config")
            .arg(&config)
            .args(extra)
            .args(["deny", "list"]);
        cmd.env_remove("SENTINEL_ADMIN_SOCKET");
        if let Some(path) = env {
            cmd.env("SENTINEL_ADMIN_SOCKET", path);
        }
        let out = cmd.output().expect("run sentinel");
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let names = |stderr: &str, path: &Path| stderr.contains(&path.display().to_string());
    let stderr = run(&[], None);
    assert!(names(&stderr, &from_config), "{stderr}");
    let flag = from_flag.display().to_string();
    let stderr = run(&["--admin-socket", &flag], None);
    assert!(
        names(&stderr, &from_flag) && !names(&stderr, &from_config),
        "{stderr}"
    );
    let stderr = run(&[], Some(&from_flag));
    assert!(names(&stderr, &from_flag), "{stderr}");
    // A configuration that does not validate is reported, not guessed past.
    std::fs::write(&config, "admin { sockett \"/x\" }\n").unwrap();
    let stderr = run(&[], None);
    assert!(stderr.contains("did you mean 'socket'"), "{stderr}");
}

#[test]
fn bad_input_is_refused_before_any_request() {
    // With no daemon at all, these must fail on the input, not on the
    // connection: the CLI checks before it sends anything.
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("absent.sock");
    for (args, expected) in client_side_cases() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&sentinel(&socket, &args), &args, expected);
    }
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("absent.sock");
    for args in [
        &["deny", "add"][..],
        &["deny", "frobnicate"],
        &["deny", "add", "198.51.100.0/24", "--tll", "1s"],
    ] {
        let out = sentinel(&socket, args);
        assert_eq!(out.status.code(), Some(2), "`sentinel {}`", args.join(" "));
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error:"));
    }
}

#[test]
fn validate_accepts_the_shipped_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/sentinel.kdl");
    let mut command = Command::new(daemon::bin());
    command.args(["validate", "--config", path]);
    let out = daemon::output(command);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

#[test]
fn validate_points_at_file_line_and_column() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cases = [
        // A bad value: one problem, on line 2, column 5.
        (
            "value.kdl",
            "kernel {\n    xdp-mode \"turbo\"\n}\n",
            ":2:5: ",
        ),
        // A bad option name.
        (
            "option.kdl",
            "kernel {\n    pin-path \"/sys/fs/bpf/x\"\n    turbo 1\n}\n",
            ":3:5: ",
        ),
        // Not KDL at all: an unclosed block.
        ("syntax.kdl", "kernel {\n    interfaces \"lo\"\n", ":1:"),
    ];
    for (name, text, position) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write the configuration");
        let mut command = Command::new(daemon::bin());
        command.arg("validate").arg("--config").arg(&path);
        let out = daemon::output(command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        let expected = format!("error: {}{position}", path.display());
        assert!(
            first.starts_with(&expected),
            "{name}: expected a line starting with {expected:?}, got: {stderr}"
        );
        assert!(
            stderr.lines().all(|l| l.starts_with("error: ")),
            "{name}: every line should be an error: {stderr}"
        );
    }
}

/// `deny list --json` and `allow list --json`.
fn lists(daemon: &Daemon) -> (Value, Value) {
    (
        daemon.cli_json(&["deny", "list", "--json"]),
        daemon.cli_json(&["allow", "list", "--json"]),
    )
}

#[test]
fn bad_input_changes_nothing_in_a_running_daemon() {
    if support::skip_unless_root("needs root (a running daemon loads BPF)") {
        return;
    }
    let daemon = Daemon::start(DaemonConfig::default().with_kernel("max-ttl-seconds 3600"));
    // Permanent entries only, so that the listings do not change by
    // themselves while the cases run.
    daemon.cli_ok(&["deny", "add", "198.51.100.0/24", "--reason", "baseline"]);
    daemon.cli_ok(&["deny", "add", "2001:db8:1::/48"]);
    daemon.cli_ok(&["allow", "add", "198.51.100.7/32"]);
    let before = lists(&daemon);

    let mut cases = client_side_cases();
    let owned = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    // Only the daemon knows its max-ttl-seconds (3600): these reach it.
    cases.push((
        owned(&["deny", "add", "203.0.113.0/24", "--ttl", "2h"]),
        "ttl 2h is out of range: it must be between 1s and 1h",
    ));
    // An existing entry with a refused TTL must keep its old one.
    cases.push((
        owned(&["deny", "add", "198.51.100.0/24", "--ttl", "3601s"]),
        "out of range: it must be between 1s and 1h",
    ));
    cases.push((
        owned(&["allow", "add", "203.0.113.0/24", "--ttl", "2h"]),
        "out of range: it must be between 1s and 1h",
    ));
    cases.push((
        owned(&["deny", "remove", "203.0.113.0/24"]),
        "203.0.113.0/24 is not in the denylist",
    ));
    cases.push((
        owned(&["deny", "remove", "2001:db8:1::/64"]),
        "2001:db8:1::/64 is not in the denylist",
    ));
    cases.push((
        owned(&["allow", "remove", "198.51.100.0/24"]),
        "198.51.100.0/24 is not in the allowlist",
    ));

    for (args, expected) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&daemon.cli(&args), &args, expected);
        assert_eq!(
            lists(&daemon),
            before,
            "`sentinel {}` changed the lists",
            args.join(" ")
        );
    }

    // What reached the daemon is counted by result; nothing was added.
    let updates = |result| {
        daemon.metric_value(
            "sentinel_denylist_updates_total",
            &[("source", "admin"), ("result", result)],
        )
    };
    assert_eq!(updates("added"), Some(2.0));
    assert_eq!(updates("invalid"), Some(2.0));
    assert_eq!(updates("not_found"), Some(2.0));
    assert_eq!(updates("replaced"), None);
    assert_eq!(
        daemon.metric_value("sentinel_denylist_entries", &[]),
        Some(2.0)
    );
}

/// The seed's pre-flight form, `sentinel --config FILE --validate`: a bad
/// file exits 1 with every problem on stderr, each at its file, line and
/// column, the seed's transport wording included; nothing on stdout.
#[test]
fn validate_flag_reports_every_problem_with_its_position() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let bad = dir.path().join("bad.kdl");
    let socket = dir.path().join("auth.sock");
    std::fs::write(
        &bad,
        format!(
            r#"routes {{
    route "api" {{
        upstream "backnd"
        filters "auth-filter"
    }}
}}
upstreams {{
    upstream "backend" {{
        targets {{ target {{ address "backend.internal"; }} }}
    }}
}}
filters {{
    filter "auth-filter" {{ agent "auth"; timeout-ms 0; }}
}}
agents {{
    agent "auth" type="auth" {{
        unix-socket "{socket}"
        request-body-mode "hybrid:0"
        circuit-breaker {{ failure-threshold 0; }}
    }}
}}
"#,
            socket = socket.display()
        ),
    )
    .expect("write the configuration");
    let mut command = Command::new(daemon::bin());
    command.arg("--config").arg(&bad).arg("--validate");
    let out = daemon::output(command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let file = bad.display().to_string();
    let expected = [
        format!(
            "error: {file}:3:18: route 'api': upstream 'backnd' is not defined (did you mean 'backend'?)"
        ),
        format!(
            "error: {file}:9:36: target address 'backend.internal' is not host:port \
             (such as \"10.0.0.1:8080\" or \"backend.internal:8080\")"
        ),
        format!("error: {file}:13:53: 'timeout-ms' must be between 1 and 300000, found 0"),
        format!(
            "error: {file}:17:21: Agent 'auth' socket path '{}' does not exist",
            socket.display()
        ),
        format!(
            "error: {file}:18:27: 'request-body-mode' hybrid threshold must be between 1 \
             and 1073741824 bytes, found 0"
        ),
        format!("error: {file}:19:45: 'failure-threshold' must be between 1 and 10000, found 0"),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines, expected, "stderr: {stderr}");
}

/// `--validate` on a file using every proxy block exits 0 and says so.
#[test]
fn validate_flag_accepts_a_good_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket_path = dir.path().join("waf.sock");
    let _agent = std::os::unix::net::UnixListener::bind(&socket_path).expect("bind a socket");
    let good = dir.path().join("good.kdl");
    std::fs::write(
        &good,
        format!(
            r#"system {{ worker-threads 2; }}
listeners {{ listener "http" {{ address "127.0.0.1:0"; }} }}
routes {{
    route "api" {{
        matches {{ path-prefix "/api/"; }}
        upstream "backend"
        filters "waf-filter"
    }}
    route "health" {{ static-response 200 "ok"; }}
}}
upstreams {{ upstream "backend" {{ targets {{ target {{ address "127.0.0.1:3000"; }} }} }} }}
filters {{ filter "waf-filter" {{ type "agent"; agent "waf"; }} }}
agents {{
    agent "waf" type="waf" {{
        unix-socket "{}"
        events "request_headers" "request_body"
        config {{ paranoia-level 2; }}
    }}
}}
waf {{ body-inspection {{ inspect-request-body #true; }} }}
limits {{ max-body-bytes 1048576; }}
profile {{ mode "monitor"; }}
"#,
            socket_path.display()
        ),
    )
    .expect("write the configuration");
    let mut command = Command::new(daemon::bin());
    command.arg("--config").arg(&good).arg("--validate");
    let out = daemon::output(command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("configuration is valid"),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
