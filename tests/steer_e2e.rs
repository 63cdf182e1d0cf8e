//! Connection steering end to end: the real daemon runs inside a test
//! network namespace (so its sk_lookup program is attached there, never to
//! the machine's own namespace) and clients in the same namespace connect
//! over its loopback, from chosen 127/8 source addresses. Each test asserts
//! what a user sees: an HTTP answer or a refused connection, watchlist
//! entries and their hits, `sentinel_steering_total`.
//!
//! Needs root (BPF, network namespaces); without it every test says
//! `SKIPPED` and returns.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use sentinel_tests::{
    self as support,
    client::{self, Outcome},
    daemon::{Daemon, DaemonConfig},
    netns::NetNs,
};

macro_rules! skip_unless_root {
    () => {
        if support::skip_unless_root("needs root (BPF, network namespaces)") {
            return;
        }
    };
}

/// Ports the steering rule names; nothing is bound on them.
const RANGE: (u16, u16) = (20000, 20049);

const BLOCKS: &str = r#"
system { worker-threads 1; }
listeners {
    listener "main" { address "127.0.0.1:0"; }
    listener "suspect" { address "127.0.0.1:0"; quarantine; }
}
routes { route "all" { static-response 200 "ok"; } }
"#;

/// The `kernel` block's steering lines.
fn steering(range: (u16, u16)) -> String {
    format!(
        "    steering {{\n        rule listener=\"main\" prefix=\"127.0.0.0/8\" ports=\"{}-{}\"\n    }}",
        range.0, range.1
    )
}

struct Setup {
    daemon: Daemon,
    ns: NetNs,
}

fn setup(range: (u16, u16)) -> Setup {
    let ns = NetNs::new();
    let daemon = Daemon::start(
        DaemonConfig::default()
            .with_blocks(BLOCKS)
            .with_kernel(&steering(range))
            .in_netns(ns.path()),
    );
    Setup { daemon, ns }
}

/// `GET /` from source address `from` (a 127/8 address of the namespace's
/// loopback) to `to`, run inside `ns`.
fn get(ns: &NetNs, from: Ipv4Addr, to: SocketAddr) -> Outcome {
    client::get_from(ns, from.into(), to, "/")
}

fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    client::connect_from(from.into(), to)
}

fn ok() -> Outcome {
    Outcome::Answered("HTTP/1.1 200 OK".into())
}

fn steered(s: &Setup, listener: &str, reason: &str) -> f64 {
    s.ns.run(|| {
        s.daemon
            .metric_value(
                "sentinel_steering_total",
                &[("listener", listener), ("reason", reason)],
            )
            .unwrap_or(0.0)
    })
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const SUSPECT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn at(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn many_ports_and_addresses_reach_the_one_listener() {
    skip_unless_root!();
    let s = setup(RANGE);
    let ports = [RANGE.0, RANGE.0 + 1, 20017, 20033, RANGE.1];
    for port in ports {
        assert_eq!(
            get(&s.ns, CLIENT, at([127, 0, 0, 1], port)),
            ok(),
            "port {port}"
        );
    }
    // Any address of the prefix, none of them bound.
    assert_eq!(get(&s.ns, CLIENT, at([127, 9, 8, 7], 20005)), ok());
    assert_eq!(steered(&s, "main", "rule"), (ports.len() + 1) as f64);
    // Outside the range: the kernel's own lookup, which finds nothing.
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], RANGE.1 + 1)),
        Outcome::Refused
    );
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], RANGE.0 - 1)),
        Outcome::Refused
    );
}

#[test]
fn watchlisted_sources_land_on_the_quarantine_listener() {
    skip_unless_root!();
    let s = setup(RANGE);
    s.daemon
        .cli_ok(&["watch", "add", "127.0.0.2", "--reason", "probing"]);
    let main = s.daemon.listener("main");
    for to in [at([127, 0, 0, 1], 20001), main] {
        assert_eq!(get(&s.ns, SUSPECT, to), ok(), "suspect to {to}");
        assert_eq!(get(&s.ns, CLIENT, to), ok(), "client to {to}");
    }
    assert_eq!(steered(&s, "suspect", "watchlist"), 2.0);
    // The client's two connections: one steered by the rule, one by the
    // main listener's own address (added because quarantine is on).
    assert_eq!(steered(&s, "main", "rule"), 2.0);
    let listed = s.daemon.cli_json(&["watch", "list", "--json"]);
    let entries = listed.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(entries[0]["prefix"], "127.0.0.2/32");
    assert_eq!(entries[0]["reason"], "probing");
    assert_eq!(entries[0]["source"], "admin");
    assert_eq!(entries[0]["hits"], 2);

    // Removed: the suspect is an ordinary client again.
    s.daemon.cli_ok(&["watch", "remove", "127.0.0.2"]);
    assert_eq!(get(&s.ns, SUSPECT, at([127, 0, 0, 1], 20001)), ok());
    assert_eq!(steered(&s, "suspect", "watchlist"), 2.0);
    assert_eq!(steered(&s, "main", "rule"), 3.0);
    // Bad input is refused with the same words as the denylist's.
    let out = s.daemon.cli(&["watch", "add", "127.0.0.1/8"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host bits set"),
        "{out:?}"
    );
}

#[test]
fn an_expired_watch_entry_stops_steering() {
    skip_unless_root!();
    let s = setup(RANGE);
    s.daemon
        .cli_ok(&["watch", "add", "127.0.0.2", "--ttl", "1s"]);
    let to = at([127, 0, 0, 1], 20002);
    assert_eq!(get(&s.ns, SUSPECT, to), ok());
    assert_eq!(steered(&s, "suspect", "watchlist"), 1.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(&s.ns, SUSPECT, to), ok());
    assert_eq!(
        steered(&s, "suspect", "watchlist"),
        1.0,
        "an expired entry must not steer"
    );
    assert_eq!(steered(&s, "main", "rule"), 1.0);
}

#[test]
fn a_reload_adds_and_removes_ports_without_rebinding() {
    skip_unless_root!();
    let s = setup((20000, 20001));
    let main = s.daemon.listener("main");
    assert_eq!(get(&s.ns, CLIENT, at([127, 0, 0, 1], 20001)), ok());
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], 20100)),
        Outcome::Refused
    );
    let text = std::fs::read_to_string(&s.daemon.config_path).unwrap();
    let text = text.replace("ports=\"20000-20001\"", "ports=\"20100-20101\"");
    std::fs::write(&s.daemon.config_path, text).unwrap();
    s.daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&s.ns, CLIENT, at([127, 0, 0, 1], 20100)) != ok() {
        assert!(
            Instant::now() < deadline,
            "the reload did not steer port 20100; log:\n{}",
            s.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&s.ns, CLIENT, at([127, 0, 0, 1], 20101)), ok());
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], 20001)),
        Outcome::Refused
    );
    assert_eq!(s.daemon.listener("main"), main, "the listener was rebound");
}

#[test]
fn stopping_the_daemon_leaves_other_sockets_as_they_were() {
    skip_unless_root!();
    let mut s = setup(RANGE);
    // Two servers of someone else in the namespace: one on a port no rule
    // names, one inside the steered range (bound, but steered past).
    let (outside, inside) = s.ns.run(|| {
        (
            TcpListener::bind("127.0.0.1:20060").unwrap(),
            TcpListener::bind("127.0.0.1:20010").unwrap(),
        )
    });
    let accepts = |l: &TcpListener| {
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match l.accept() {
                Ok(_) => return true,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return false,
            }
        }
    };
    let connect = |s: &Setup, port| {
        s.ns.run(move || connect_from(CLIENT, at([127, 0, 0, 1], port)).is_ok())
    };
    assert!(connect(&s, 20060));
    assert!(
        accepts(&outside),
        "an unsteered port reaches its own socket"
    );
    assert_eq!(get(&s.ns, CLIENT, at([127, 0, 0, 1], 20010)), ok());
    assert!(!accepts(&inside), "a steered port goes to the listener");

    assert!(s.daemon.stop().success(), "log:\n{}", s.daemon.log());
    assert!(connect(&s, 20060));
    assert!(accepts(&outside));
    assert!(connect(&s, 20010));
    assert!(accepts(&inside), "after stop, steering is gone");
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], 20011)),
        Outcome::Refused
    );
}

/// IPv6 inside the namespace: sources on its loopback, and a prefix the
/// kernel delivers locally (a `local` route, as docs/configuration.md tells
/// operators to add) that no socket is bound in.
const STEERED6: &str = "2001:db8:5f:1::/64";
const SUSPECT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x5f, 0, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x5f, 0, 0, 0, 0, 3);

fn ipv6_namespace() -> NetNs {
    let ns = NetNs::new();
    ns.ip(&["-6", "route", "add", "local", STEERED6, "dev", "lo"]);
    for source in [SUSPECT6, CLIENT6] {
        let host = format!("{source}/128");
        ns.ip(&["-6", "addr", "add", &host, "dev", "lo", "nodad"]);
    }
    ns
}

fn start_in(ns: &NetNs, blocks: &str, kernel: &str) -> Daemon {
    Daemon::start(
        DaemonConfig::default()
            .with_blocks(blocks)
            .with_kernel(kernel)
            .in_netns(ns.path()),
    )
}

fn get6(ns: &NetNs, from: Ipv6Addr, to: SocketAddr) -> Outcome {
    client::get_from(ns, from.into(), to, "/")
}

fn at6(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[test]
fn ipv6_prefixes_and_watchlisted_ipv6_sources_are_steered() {
    skip_unless_root!();
    let ns = ipv6_namespace();
    let daemon = start_in(
        &ns,
        r#"
system { worker-threads 1; }
listeners {
    listener "main" { address "[::1]:0"; }
    listener "suspect" { address "[::]:0"; quarantine; }
}
routes { route "all" { static-response 200 "ok"; } }
"#,
        &format!(
            "    steering {{\n        rule listener=\"main\" prefix=\"{STEERED6}\" ports=\"{}-{}\"\n    }}",
            RANGE.0, RANGE.1
        ),
    );
    let s = Setup { daemon, ns };
    // Any address of the prefix, any port of the range, none bound.
    for to in [
        at6("2001:db8:5f:1::7", RANGE.0),
        at6("2001:db8:5f:1:ffff:ffff:ffff:fffe", RANGE.1),
        at6("2001:db8:5f:1::1:0", 20021),
    ] {
        assert_eq!(get6(&s.ns, CLIENT6, to), ok(), "to {to}");
    }
    assert_eq!(steered(&s, "main", "rule"), 3.0);
    assert_eq!(
        get6(&s.ns, CLIENT6, at6("2001:db8:5f:1::7", RANGE.1 + 1)),
        Outcome::Refused
    );

    s.daemon.cli_ok(&[
        "watch",
        "add",
        &SUSPECT6.to_string(),
        "--reason",
        "v6 probe",
    ]);
    let main = s.daemon.listener("main");
    for to in [at6("2001:db8:5f:1::7", 20002), main] {
        assert_eq!(get6(&s.ns, SUSPECT6, to), ok(), "suspect to {to}");
        assert_eq!(get6(&s.ns, CLIENT6, to), ok(), "client to {to}");
    }
    assert_eq!(steered(&s, "suspect", "watchlist"), 2.0);
    assert_eq!(steered(&s, "main", "rule"), 5.0);
    assert_eq!(steered(&s, "suspect", "no_socket"), 0.0);
    let listed = s.daemon.cli_json(&["watch", "list", "--json"]);
    let entries = listed.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(entries[0]["prefix"], format!("{SUSPECT6}/128"));
    assert_eq!(entries[0]["hits"], 2);
    assert!(entries[0]["last_hit"].is_string(), "{listed}");
}

#[test]
fn a_dual_stack_listener_quarantines_sources_of_both_families() {
    skip_unless_root!();
    let ns = ipv6_namespace();
    let daemon = start_in(
        &ns,
        r#"
system { worker-threads 1; }
listeners {
    listener "main" { address "[::]:0"; }
    listener "suspect" { address "[::]:0"; quarantine; }
}
routes { route "all" { static-response 200 "ok"; } }
"#,
        "",
    );
    let s = Setup { daemon, ns };
    s.daemon.cli_ok(&["watch", "add", &SUSPECT.to_string()]);
    s.daemon.cli_ok(&["watch", "add", &SUSPECT6.to_string()]);
    let port = s.daemon.listener("main").port();
    let (v4, v6) = (at([127, 0, 0, 1], port), at6("::1", port));
    assert_eq!(get(&s.ns, SUSPECT, v4), ok());
    assert_eq!(get6(&s.ns, SUSPECT6, v6), ok());
    assert_eq!(steered(&s, "suspect", "watchlist"), 2.0);
    assert_eq!(get(&s.ns, CLIENT, v4), ok());
    assert_eq!(get6(&s.ns, CLIENT6, v6), ok());
    assert_eq!(steered(&s, "main", "rule"), 2.0);
    let listed = s.daemon.cli_json(&["watch", "list", "--json"]);
    let hits: Vec<_> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            (
                e["prefix"].as_str().unwrap_or("?").to_owned(),
                e["hits"].clone(),
            )
        })
        .collect();
    assert_eq!(
        hits,
        [
            ("127.0.0.2/32".to_owned(), 1.into()),
            (format!("{SUSPECT6}/128"), 1.into())
        ]
    );
}

/// sk_lookup links attached to `ns`'s network namespace, as `bpftool
/// link show` lists them; `None` when bpftool is missing.
fn sk_lookup_links(ns: &NetNs) -> Option<usize> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(ns.path())
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", ns.path().display()))
        .ino();
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .ok()?;
    assert!(out.status.success(), "bpftool link show: {out:?}");
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool JSON: {e}"));
    let count = links.as_array().map_or(0, |links| {
        links
            .iter()
            .filter(|l| l["attach_type"] == "sk_lookup" && l["netns_ino"] == ino)
            .count()
    });
    Some(count)
}

/// sk_lookup programs that process `pid` holds a descriptor of, read from
/// `/proc/<pid>/fdinfo` (`prog_type` 30 is `BPF_PROG_TYPE_SK_LOOKUP`; this
/// bpftool cannot list programs by process).
fn sk_lookup_programs_of(pid: u32) -> usize {
    const BPF_PROG_TYPE_SK_LOOKUP: &str = "30";
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| {
            info.lines().any(|l| {
                l.strip_prefix("prog_type:")
                    .is_some_and(|t| t.trim() == BPF_PROG_TYPE_SK_LOOKUP)
            })
        })
        .count()
}

#[test]
fn the_program_is_attached_only_while_something_is_steered() {
    skip_unless_root!();
    let ns = NetNs::new();
    if sk_lookup_links(&ns).is_none() {
        // As support::skip_unless_root: past libtest's capture.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the_program_is_attached_only_while_something_is_steered: needs bpftool"
        );
        return;
    }
    let main_only = r#"
system { worker-threads 1; }
listeners {
    listener "main" { address "127.0.0.1:0"; }
}
routes { route "all" { static-response 200 "ok"; } }
"#;
    let mut daemon = start_in(&ns, main_only, "    // steering");
    let links = |ns: &NetNs| sk_lookup_links(ns).unwrap_or(usize::MAX);
    assert_eq!(links(&ns), 0, "nothing is steered: no link");
    let pid = daemon.pid().expect("running");
    assert_eq!(sk_lookup_programs_of(pid), 0, "nor a loaded program");
    let to = at([127, 0, 0, 1], 20003);
    assert_eq!(get(&ns, CLIENT, to), Outcome::Refused);

    // `edit` the file, reload, and wait until the link count is `want`.
    let reload = |daemon: &Daemon, edit: &dyn Fn(String) -> String, want: usize| {
        let text = std::fs::read_to_string(&daemon.config_path).unwrap();
        std::fs::write(&daemon.config_path, edit(text)).unwrap();
        daemon.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while links(&ns) != want {
            assert!(
                Instant::now() < deadline,
                "after the reload, {} sk_lookup links instead of {want}; log:\n{}",
                links(&ns),
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let rule = steering(RANGE);
    reload(&daemon, &|t| t.replace("    // steering", &rule), 1);
    assert_eq!(sk_lookup_programs_of(pid), 1);
    assert_eq!(get(&ns, CLIENT, to), ok());
    reload(&daemon, &|t| t.replace(&rule, "    // steering"), 0);
    assert_eq!(get(&ns, CLIENT, to), Outcome::Refused);
    // A quarantine listener alone steers the other listeners' addresses.
    let with_quarantine = |t: String| {
        t.replace(
            "listener \"main\" { address \"127.0.0.1:0\"; }",
            "listener \"main\" { address \"127.0.0.1:0\"; }\n    \
             listener \"suspect\" { address \"127.0.0.1:0\"; quarantine; }",
        )
    };
    reload(&daemon, &with_quarantine, 1);
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
    assert_eq!(links(&ns), 0, "stopping detaches");
}
