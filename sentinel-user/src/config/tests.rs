use std::path::Path;

use super::*;

/// Parses `text` as `test.kdl`: the configuration, or every problem as
/// `file:line:column: message`.
pub(super) fn parse(text: &str) -> Result<Config, Vec<String>> {
    Config::parse(&Source::new(Path::new("test.kdl"), text)).map_err(|e| match e {
        ConfigError::Invalid { problems } => problems.iter().map(|p| p.to_string()).collect(),
        other => vec![other.to_string()],
    })
}

#[test]
fn empty_file_is_all_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
}

#[test]
fn full_kernel_block() {
    let cfg = parse(
        r#"
kernel {
    interfaces "eth0" "eth1"
    xdp-mode "native"
    pin-path "/sys/fs/bpf/custom"
    capacity {
        denylist-v4 2000000
        allowlist-v6 1024
    }
    default-ttl-seconds 3600
    max-ttl-seconds 86400
    reap-interval-ms 500
    allowlist {
        prefix "10.0.0.0/8" reason="office"
    }
    denylist {
        prefix "192.0.2.0/24" reason="scanners"
        prefix "2001:db8::/32"
    }
    port-policy {
        deny-tcp 23 "6000-6063"
        deny-udp 19
    }
}
admin { socket "/tmp/admin.sock" }
observability { metrics { address "127.0.0.1:9191" } }
"#,
    )
    .unwrap();
    let k = &cfg.kernel;
    assert_eq!(k.interfaces, ["eth0", "eth1"]);
    assert_eq!(k.xdp_mode, XdpMode::Native);
    assert_eq!(k.pin_path, Path::new("/sys/fs/bpf/custom"));
    assert_eq!(k.capacity.denylist_v4, 2_000_000);
    assert_eq!(k.capacity.allowlist_v6, 1024);
    assert_eq!(
        k.capacity.denylist_v6,
        sentinel_common::DEFAULT_DENY_V6_ENTRIES
    );
    assert_eq!(k.default_ttl_seconds, 3600);
    assert_eq!(k.max_ttl_seconds, 86400);
    assert_eq!(k.reap_interval_ms, 500);
    assert_eq!(k.allowlist[0].reason, "office");
    assert_eq!(k.denylist.len(), 2);
    assert_eq!(k.denylist[1].reason, "config");
    assert_eq!(k.port_policy.deny_tcp, [(23, 23), (6000, 6063)]);
    assert_eq!(k.port_policy.deny_udp, [(19, 19)]);
    assert_eq!(cfg.admin.socket, Path::new("/tmp/admin.sock"));
    assert_eq!(
        cfg.observability.metrics_address,
        Some("127.0.0.1:9191".parse().unwrap())
    );
}

#[test]
fn reports_every_problem_with_position() {
    let errors = parse(
        r#"kernel {
    xdp-mode "turbo"
    pin-pth "/x"
    denylist {
        prefix "0.0.0.0/0"
        prefix "192.0.2.1/24"
    }
    max-ttl-seconds "long"
}
routez { }
"#,
    )
    .unwrap_err();
    assert_eq!(errors.len(), 6, "{errors:#?}");
    assert!(
        errors[0].starts_with("test.kdl:2:5: 'xdp-mode' must be"),
        "{}",
        errors[0]
    );
    assert_eq!(
        errors[1],
        "test.kdl:3:5: unknown option in 'kernel' 'pin-pth' (did you mean 'pin-path'?)"
    );
    assert!(
        errors[2].starts_with("test.kdl:5:16: refusing to deny 0.0.0.0/0"),
        "{}",
        errors[2]
    );
    assert!(
        errors[3].contains("test.kdl:6:16: 192.0.2.1/24 has host bits set"),
        "{}",
        errors[3]
    );
    assert!(
        errors[4].starts_with("test.kdl:8:21: 'max-ttl-seconds' must be an integer"),
        "{}",
        errors[4]
    );
    assert!(
        errors[5].starts_with("test.kdl:10:1: unknown block 'routez'"),
        "{}",
        errors[5]
    );
}

#[test]
fn syntax_errors_have_positions() {
    let errors = parse("kernel {\n    interfaces \"eth0\n}\n").unwrap_err();
    assert!(!errors.is_empty());
    assert!(errors[0].starts_with("test.kdl:"), "{}", errors[0]);
}

#[test]
fn value_checks() {
    for (text, needle) in [
        ("kernel { interfaces }", "needs at least one value"),
        (
            "kernel { interfaces \"a/b\" }",
            "not a valid interface name",
        ),
        ("kernel { pin-path \"relative\" }", "absolute path"),
        ("kernel { capacity { denylist-v4 0 } }", "between 1 and"),
        ("kernel { port-policy { deny-tcp 0 } }", "not a port"),
        ("kernel { port-policy { deny-tcp \"90-80\" } }", "empty"),
        (
            "kernel { default-ttl-seconds 100\n max-ttl-seconds 10 }",
            "longer than 'max-ttl-seconds'",
        ),
        (
            "kernel { denylist { prefix \"192.0.2.0/24\"\n prefix \"192.0.2.0/24\" } }",
            "listed twice",
        ),
        (
            "kernel { denylist { prefix \"192.0.2.0/24\" why=\"x\" } }",
            "unknown property 'why'",
        ),
        ("admin { socket 5 }", "must be a string"),
        (
            "observability { metrics { address \"localhost\" } }",
            "IP:PORT",
        ),
        ("kernel { }\nkernel { }", "appears more than once"),
        ("kernel \"x\" { }", "takes no arguments"),
    ] {
        let errors = parse(text).unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{text:?}: expected {needle:?} in {errors:#?}"
        );
    }
}

#[test]
fn metrics_can_be_disabled() {
    let cfg =
        parse("observability { metrics { enabled #false\n address \"127.0.0.1:1\" } }").unwrap();
    assert_eq!(cfg.observability.metrics_address, None);
}

/// Files a configuration can name, in a temporary directory: PEM
/// certificates and keys, an empty file, a listening Unix socket.
pub(super) struct Files {
    dir: tempfile::TempDir,
    _socket: std::os::unix::net::UnixListener,
}

impl Files {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        // The checks read PEM structure only, so any base64 body will do.
        let cert = "-----BEGIN CERTIFICATE-----\nMIIBAAEC\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIBAAEC\n-----END PRIVATE KEY-----\n";
        for (name, text) in [
            ("cert.pem", cert),
            ("ca.pem", cert),
            ("key.pem", key),
            ("empty.pem", ""),
            ("not-pem.txt", "hello\n"),
            ("plain-file", "x"),
        ] {
            std::fs::write(dir.path().join(name), text).expect("write fixture");
        }
        let socket = std::os::unix::net::UnixListener::bind(dir.path().join("agent.sock"))
            .expect("bind a unix socket");
        Self {
            dir,
            _socket: socket,
        }
    }

    /// `$D` in `text` becomes the directory holding the fixtures.
    pub(super) fn expand(&self, text: &str) -> String {
        text.replace("$D", &self.dir.path().display().to_string())
    }

    pub(super) fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Parses `text` after [`Files::expand`].
    pub(super) fn parse(&self, text: &str) -> Result<Config, Vec<String>> {
        parse(&self.expand(text))
    }

    /// The problems of `text`, which must not parse.
    pub(super) fn errors(&self, text: &str) -> Vec<String> {
        match self.parse(text) {
            Ok(_) => panic!("expected errors in:\n{text}"),
            Err(e) => e,
        }
    }
}

/// Asserts that exactly one problem contains `needle`, and that it is at
/// `line:column`.
#[track_caller]
pub(super) fn assert_problem(errors: &[String], line_col: &str, needle: &str) {
    let found: Vec<&String> = errors.iter().filter(|e| e.contains(needle)).collect();
    assert_eq!(found.len(), 1, "expected one {needle:?} in {errors:#?}");
    let prefix = format!("test.kdl:{line_col}: ");
    assert!(
        found[0].starts_with(&prefix),
        "expected {needle:?} at {line_col}, got {} among {errors:#?}",
        found[0]
    );
}
