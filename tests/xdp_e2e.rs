//! End to end over a veth pair: the real daemon attached (in native and in
//! generic mode) to the root-side end, servers in the root namespace,
//! clients in a test namespace. Each test asserts what a user sees:
//! connections that succeed or fail, entries listed, counters exact.
//!
//! Needs root (XDP, network namespaces); without it every test says
//! `SKIPPED` and returns.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use sentinel_tests::{
    self as support,
    daemon::{Daemon, DaemonConfig},
    netns::{Attempt, EchoServer, NetNs, udp_received},
};
use serde_json::Value;

/// How long a blocked connection attempt waits for an answer. The SYN is
/// dropped silently, so a blocked attempt ends in a timeout.
const BLOCKED_WAIT: Duration = Duration::from_secs(1);
/// Ethernet + IPv4 + UDP headers: the XDP program counts whole frames.
const UDP4_OVERHEAD: u64 = 14 + 20 + 8;

macro_rules! skip_unless_root {
    ($name:literal) => {
        if support::skip_unless_root("needs root (XDP, network namespaces)") {
            return;
        }
    };
}

/// A namespace and a daemon attached to its root-side veth end. Either may
/// go first on drop: deleting the veth also ends the XDP link.
struct Setup {
    daemon: Daemon,
    ns: NetNs,
}

fn setup(mode: &str, kernel_extra: &str) -> Setup {
    setup_in(NetNs::new(), mode, kernel_extra)
}

fn setup_in(ns: NetNs, mode: &str, kernel_extra: &str) -> Setup {
    let daemon = Daemon::start(DaemonConfig::attached(&ns.host_if, mode).with_kernel(kernel_extra));
    assert_eq!(
        daemon.mode(&ns.host_if),
        mode,
        "`stats --json` reports another XDP mode than the one configured"
    );
    Setup { daemon, ns }
}

/// Asserts that a client in `ns` can talk to `to`. A few attempts are
/// allowed: right after an entry is removed, neighbour discovery may still
/// be catching up.
fn assert_passes(ns: &NetNs, to: SocketAddr, context: &str) {
    let mut last = Attempt::TimedOut;
    for _ in 0..3 {
        last = ns.tcp_exchange(to, Duration::from_secs(2));
        if last == Attempt::Exchanged {
            return;
        }
    }
    panic!("{context}: a client in the namespace cannot reach {to}: {last:?}");
}

/// Asserts that a connection from `ns` to `to` gets no answer.
fn assert_blocked(ns: &NetNs, to: SocketAddr, context: &str) {
    assert_blocked_within(ns, to, BLOCKED_WAIT, context);
}

fn assert_blocked_within(ns: &NetNs, to: SocketAddr, wait: Duration, context: &str) {
    let result = ns.tcp_exchange(to, wait);
    assert_eq!(
        result,
        Attempt::TimedOut,
        "{context}: a connection to {to} should be dropped"
    );
}

/// Polls `/metrics` until the series reaches `at_least` (10 s at most);
/// its value then.
fn metric_reaching(daemon: &Daemon, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = daemon.metric_value(name, labels).unwrap_or(0.0);
        if value >= at_least || Instant::now() > deadline {
            // Give stragglers a moment, so "exactly" below means exactly.
            std::thread::sleep(Duration::from_millis(200));
            return daemon.metric_value(name, labels).unwrap_or(0.0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn entry<'a>(list: &'a [Value], prefix: &str) -> Option<&'a Value> {
    list.iter().find(|e| e["prefix"] == prefix)
}

/// The /24 that holds `addr`.
fn covering_24(addr: std::net::Ipv4Addr) -> String {
    Ipv4Net::new(addr, 24)
        .expect("/24 is valid")
        .trunc()
        .to_string()
}

// ---------------------------------------------------------------------------
// Deny, then remove: exact host, covering prefixes, both families.

fn deny_blocks_and_remove_restores(mode: &str) {
    let Setup { daemon, ns } = setup(mode, "");
    let v4 = EchoServer::start(ns.host_v4);
    let v6 = EchoServer::start(ns.host_v6);
    assert_passes(&ns, v4.addr, "before any entry (IPv4)");
    assert_passes(&ns, v6.addr, "before any entry (IPv6)");

    let cases = [
        (format!("{}/32", ns.peer_v4), v4.addr, v6.addr),
        (ns.v4_net.to_string(), v4.addr, v6.addr),
        (covering_24(ns.peer_v4), v4.addr, v6.addr),
        (format!("{}/128", ns.peer_v6), v6.addr, v4.addr),
        (ns.v6_net.to_string(), v6.addr, v4.addr),
    ];
    for (prefix, target, other) in &cases {
        let out = daemon.cli_ok(&["deny", "add", prefix, "--reason", "e2e"]);
        assert!(out.contains(prefix.as_str()), "`deny add` said: {out}");
        assert_blocked(&ns, *target, &format!("after `deny add {prefix}`"));
        assert_passes(
            &ns,
            *other,
            &format!("other family while {prefix} is denied"),
        );

        let list = daemon.deny_list();
        let listed = entry(&list, prefix)
            .unwrap_or_else(|| panic!("`deny list --json` lacks {prefix}: {list:?}"));
        assert_eq!(listed["source"], "admin");
        assert_eq!(listed["reason"], "e2e");
        assert_eq!(listed["ttl_remaining_seconds"], Value::Null);
        assert!(
            listed["hits"].as_u64().unwrap_or(0) >= 1 && listed["last_hit"].is_string(),
            "the dropped SYN should count as a hit on {prefix}: {listed}"
        );

        daemon.cli_ok(&["deny", "remove", prefix]);
        assert_passes(&ns, *target, &format!("after `deny remove {prefix}`"));
        assert!(entry(&daemon.deny_list(), prefix).is_none());
    }
}

#[test]
fn deny_blocks_and_remove_restores_native() {
    skip_unless_root!("deny_blocks_and_remove_restores_native");
    deny_blocks_and_remove_restores("native");
}

#[test]
fn deny_blocks_and_remove_restores_generic() {
    skip_unless_root!("deny_blocks_and_remove_restores_generic");
    deny_blocks_and_remove_restores("generic");
}

// ---------------------------------------------------------------------------
// TTL: blocked until it expires, then passes without anyone removing it.

fn ttl_expires_on_time(mode: &str) {
    let Setup { daemon, ns } = setup(mode, "reap-interval-ms 200");
    let server = EchoServer::start(ns.host_v4);
    assert_passes(&ns, server.addr, "before any entry");
    let prefix = format!("{}/32", ns.peer_v4);

    // The entry expires 3 s after the daemon wrote it, which is between
    // these two instants.
    let before = Instant::now();
    daemon.cli_ok(&["deny", "add", &prefix, "--ttl", "3s"]);
    let after = Instant::now();
    assert_blocked(&ns, server.addr, "right after `deny add --ttl 3s`");

    // At about 2 s: one attempt, short enough to end well before 3 s (a
    // SYN is retransmitted only after 1 s).
    let at_two = before + Duration::from_millis(1900);
    std::thread::sleep(at_two.saturating_duration_since(Instant::now()));
    let left = (before + Duration::from_millis(2800)).saturating_duration_since(Instant::now());
    assert!(
        left >= Duration::from_millis(200),
        "the machine stalled for {:?}; cannot check the entry at 2 s",
        Instant::now() - before
    );
    assert_blocked_within(
        &ns,
        server.addr,
        left.min(Duration::from_millis(800)),
        "at ~2 s",
    );

    // By 4.5 s it must pass.
    let deadline = after + Duration::from_millis(4500);
    let passed_at = loop {
        if ns.tcp_exchange(server.addr, Duration::from_millis(300)) == Attempt::Exchanged {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "still blocked {:?} after a 3 s TTL",
            Instant::now() - after
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(passed_at - before >= Duration::from_millis(2800));
    assert!(
        entry(&daemon.deny_list(), &prefix).is_none(),
        "an expired entry is still listed"
    );
    let expired = &[("source", "reaper"), ("result", "expired")];
    assert_eq!(
        metric_reaching(&daemon, "sentinel_denylist_updates_total", expired, 1.0),
        1.0,
        "the reaper should count the expired entry once"
    );
    assert_eq!(
        daemon.metric_value("sentinel_denylist_entries", &[]),
        Some(0.0)
    );
}

#[test]
fn ttl_expires_on_time_native() {
    skip_unless_root!("ttl_expires_on_time_native");
    ttl_expires_on_time("native");
}

#[test]
fn ttl_expires_on_time_generic() {
    skip_unless_root!("ttl_expires_on_time_generic");
    ttl_expires_on_time("generic");
}

// ---------------------------------------------------------------------------
// Restarts (clean and after a crash) keep entries and their expiry.

/// Asserts both entries are listed and block; returns the TTL entry's
/// remaining seconds.
fn assert_entries_survived(s: &Setup, v4: SocketAddr, v6: SocketAddr, when: &str) -> f64 {
    assert_blocked(&s.ns, v4, &format!("permanent entry {when}"));
    assert_blocked(&s.ns, v6, &format!("TTL entry {when}"));
    let list = s.daemon.deny_list();
    assert_eq!(list.len(), 2, "{when}: {list:?}");
    let permanent = entry(&list, &format!("{}/32", s.ns.peer_v4))
        .unwrap_or_else(|| panic!("{when}: permanent entry missing: {list:?}"));
    assert_eq!(permanent["ttl_remaining_seconds"], Value::Null, "{when}");
    assert_eq!(permanent["reason"], "permanent", "{when}");
    let timed = entry(&list, &format!("{}/128", s.ns.peer_v6))
        .unwrap_or_else(|| panic!("{when}: TTL entry missing: {list:?}"));
    assert_eq!(timed["reason"], "sixty seconds", "{when}");
    let left = timed["ttl_remaining_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("{when}: TTL entry has no expiry: {timed}"));
    assert!(
        left > 0.0 && left < 60.0,
        "{when}: {left} s left of a 60 s TTL"
    );
    left
}

fn restart_keeps_entries(mode: &str) {
    let mut s = setup(mode, "");
    let v4 = EchoServer::start(s.ns.host_v4);
    let v6 = EchoServer::start(s.ns.host_v6);
    assert_passes(&s.ns, v4.addr, "before any entry (IPv4)");
    assert_passes(&s.ns, v6.addr, "before any entry (IPv6)");
    let permanent = format!("{}/32", s.ns.peer_v4);
    let timed = format!("{}/128", s.ns.peer_v6);
    s.daemon
        .cli_ok(&["deny", "add", &permanent, "--reason", "permanent"]);
    s.daemon.cli_ok(&[
        "deny",
        "add",
        &timed,
        "--ttl",
        "60s",
        "--reason",
        "sixty seconds",
    ]);
    let first = assert_entries_survived(&s, v4.addr, v6.addr, "before any restart");

    // SIGTERM: clean exit, XDP detached, socket removed, maps kept.
    let status = s.daemon.stop();
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
    assert!(
        !s.daemon.admin_socket.exists(),
        "the admin socket is left behind after SIGTERM"
    );
    assert!(s.daemon.pin_path.exists(), "pinned maps removed on SIGTERM");
    assert_passes(&s.ns, v4.addr, "while the daemon is stopped (XDP detached)");
    s.daemon.restart();
    assert_eq!(s.daemon.mode(&s.ns.host_if), mode);
    let second = assert_entries_survived(&s, v4.addr, v6.addr, "after SIGTERM and restart");
    assert!(
        second < first - 1.0,
        "the TTL was reset by the restart: {first} s left before, {second} s after"
    );

    // SIGKILL: no cleanup at all; the stale socket must be replaced.
    s.daemon.kill9();
    assert!(
        s.daemon.admin_socket.exists(),
        "expected a stale admin socket after SIGKILL"
    );
    s.daemon.restart();
    assert_eq!(s.daemon.mode(&s.ns.host_if), mode);
    let third = assert_entries_survived(&s, v4.addr, v6.addr, "after SIGKILL and restart");
    assert!(
        third < second,
        "the TTL was reset by the restart: {second} s left before, {third} s after"
    );
}

#[test]
fn restart_keeps_entries_native() {
    skip_unless_root!("restart_keeps_entries_native");
    restart_keeps_entries("native");
}

#[test]
fn restart_keeps_entries_generic() {
    skip_unless_root!("restart_keeps_entries_generic");
    restart_keeps_entries("generic");
}

// ---------------------------------------------------------------------------
// Counters: exactly the packets sent, in /metrics and `stats --json`.

fn metrics_match_packets_sent(mode: &str) {
    const N: usize = 50;
    const PAYLOAD: usize = 100;
    let Setup { daemon, ns } = setup(mode, "");
    let sink = UdpSocket::bind((ns.host_v4, 0)).expect("bind the UDP sink");
    let to = sink.local_addr().expect("sink address");
    // One datagram through first: neighbours resolved, path proven.
    ns.send_udp(to, 1, PAYLOAD);
    assert_eq!(
        udp_received(&sink),
        1,
        "the path does not work before any entry"
    );

    let denied = format!("{}/32", ns.peer_v4);
    let unrelated = "2001:db8:ffff:ffff::/64";
    daemon.cli_ok(&["deny", "add", &denied]);
    daemon.cli_ok(&["deny", "add", unrelated]);
    ns.send_udp(to, N, PAYLOAD);

    let iface = ns.host_if.as_str();
    let labels = &[
        ("interface", iface),
        ("action", "drop"),
        ("reason", "denylist"),
    ];
    let frame = UDP4_OVERHEAD + PAYLOAD as u64;
    let packets = metric_reaching(&daemon, "sentinel_xdp_packets_total", labels, N as f64);
    assert_eq!(packets, N as f64, "packets dropped by the denylist");
    assert_eq!(
        daemon.metric_value("sentinel_xdp_bytes_total", labels),
        Some((N as u64 * frame) as f64),
        "bytes dropped by the denylist ({frame}-byte frames)"
    );
    assert_eq!(
        daemon.counters(iface, "denylist"),
        (N as u64, N as u64 * frame),
        "`stats --json` disagrees with /metrics"
    );
    assert_eq!(
        udp_received(&sink),
        0,
        "denied datagrams reached the socket"
    );

    let stats = daemon.stats();
    assert_eq!(stats["denylist_entries"], 2, "{stats}");
    assert_eq!(
        daemon.metric_value("sentinel_denylist_entries", &[]),
        Some(2.0)
    );
    assert_eq!(
        daemon.metric_value(
            "sentinel_denylist_updates_total",
            &[("source", "admin"), ("result", "added")]
        ),
        Some(2.0)
    );
    let list = daemon.deny_list();
    assert_eq!(
        entry(&list, &denied).map(|e| e["hits"].clone()),
        Some(Value::from(N))
    );
    assert_eq!(
        entry(&list, unrelated).map(|e| e["hits"].clone()),
        Some(Value::from(0))
    );
}

#[test]
fn metrics_match_packets_sent_native() {
    skip_unless_root!("metrics_match_packets_sent_native");
    metrics_match_packets_sent("native");
}

#[test]
fn metrics_match_packets_sent_generic() {
    skip_unless_root!("metrics_match_packets_sent_generic");
    metrics_match_packets_sent("generic");
}

// ---------------------------------------------------------------------------
// Port policy: denied destination ports dropped, others pass.

fn port_policy_drops_denied_ports(mode: &str) {
    const N: usize = 20;
    const PAYLOAD: usize = 64;
    let ns = NetNs::new();
    let udp_denied = UdpSocket::bind((ns.host_v4, 0)).expect("bind a UDP socket");
    let udp_open = UdpSocket::bind((ns.host_v4, 0)).expect("bind a UDP socket");
    let tcp_denied = EchoServer::start(ns.host_v4);
    let tcp_open = EchoServer::start(ns.host_v4);
    let udp_port = udp_denied.local_addr().expect("address").port();
    let policy = format!(
        "port-policy {{\n    deny-tcp {}\n    deny-udp {udp_port}\n}}",
        tcp_denied.addr.port()
    );
    let Setup { daemon, ns } = setup_in(ns, mode, &policy);
    let iface = ns.host_if.as_str();

    ns.send_udp(udp_open.local_addr().expect("address"), N, PAYLOAD);
    assert_eq!(udp_received(&udp_open), N, "datagrams to an open port");
    ns.send_udp(udp_denied.local_addr().expect("address"), N, PAYLOAD);
    let labels = &[("interface", iface), ("action", "drop"), ("reason", "port")];
    let frame = UDP4_OVERHEAD + PAYLOAD as u64;
    let packets = metric_reaching(&daemon, "sentinel_xdp_packets_total", labels, N as f64);
    assert_eq!(packets, N as f64, "datagrams dropped by the port policy");
    assert_eq!(
        daemon.metric_value("sentinel_xdp_bytes_total", labels),
        Some((N as u64 * frame) as f64)
    );
    assert_eq!(daemon.counters(iface, "port"), (N as u64, N as u64 * frame));
    assert_eq!(
        udp_received(&udp_denied),
        0,
        "datagrams to a denied port arrived"
    );
    let passed = daemon.counters(iface, "pass").0;
    assert!(passed >= N as u64, "only {passed} packets counted as pass");
    assert_eq!(daemon.counters(iface, "denylist").0, 0);

    assert_passes(&ns, tcp_open.addr, "TCP to an open port");
    assert_blocked(&ns, tcp_denied.addr, "TCP to a denied port");
    assert!(
        daemon.counters(iface, "port").0 > N as u64,
        "the SYN was not counted"
    );
}

#[test]
fn port_policy_drops_denied_ports_native() {
    skip_unless_root!("port_policy_drops_denied_ports_native");
    port_policy_drops_denied_ports("native");
}

#[test]
fn port_policy_drops_denied_ports_generic() {
    skip_unless_root!("port_policy_drops_denied_ports_generic");
    port_policy_drops_denied_ports("generic");
}

// ---------------------------------------------------------------------------
// Allowlist before denylist.

fn allowlist_overrides_denylist(mode: &str) {
    const N: usize = 30;
    let Setup { daemon, ns } = setup(mode, "");
    let sink = UdpSocket::bind((ns.host_v4, 0)).expect("bind the UDP sink");
    let to = sink.local_addr().expect("sink address");
    let server = EchoServer::start(ns.host_v4);
    let host = format!("{}/32", ns.peer_v4);
    let net = covering_24(ns.peer_v4);
    daemon.cli_ok(&["allow", "add", &host, "--reason", "trusted"]);
    daemon.cli_ok(&["deny", "add", &net]);

    ns.send_udp(to, N, 32);
    assert_eq!(udp_received(&sink), N, "allowlisted datagrams");
    let iface = ns.host_if.as_str();
    let labels = &[
        ("interface", iface),
        ("action", "pass"),
        ("reason", "allowlist"),
    ];
    let packets = metric_reaching(&daemon, "sentinel_xdp_packets_total", labels, N as f64);
    assert_eq!(packets, N as f64, "packets passed by the allowlist");
    assert_eq!(daemon.counters(iface, "allowlist").0, N as u64);
    assert_eq!(daemon.counters(iface, "denylist").0, 0);
    assert_passes(&ns, server.addr, "allowlisted host inside a denied /24");

    let denied = daemon.deny_list();
    assert_eq!(
        entry(&denied, &net).map(|e| e["hits"].clone()),
        Some(Value::from(0))
    );
    let allowed = daemon.cli_json(&["allow", "list", "--json"]);
    let allowed = allowed.as_array().cloned().unwrap_or_default();
    let hits = entry(&allowed, &host).and_then(|e| e["hits"].as_u64());
    assert!(hits >= Some(N as u64), "allowlist hits: {hits:?}");

    // Without the allowlist entry, the /24 applies.
    daemon.cli_ok(&["allow", "remove", &host]);
    assert_blocked(&ns, server.addr, "after `allow remove`");
    assert!(daemon.counters(iface, "denylist").0 >= 1);
}

#[test]
fn allowlist_overrides_denylist_native() {
    skip_unless_root!("allowlist_overrides_denylist_native");
    allowlist_overrides_denylist("native");
}

#[test]
fn allowlist_overrides_denylist_generic() {
    skip_unless_root!("allowlist_overrides_denylist_generic");
    allowlist_overrides_denylist("generic");
}
