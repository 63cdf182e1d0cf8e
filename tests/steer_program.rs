//! Every branch of the sk_lookup steering program, through
//! `BPF_PROG_TEST_RUN` on crafted lookups: which listener's socket it
//! selects (by `SO_COOKIE`), and the counters it keeps.
//!
//! Needs root (loading BPF programs); without it each test says SKIPPED.

use std::{
    net::{IpAddr, TcpListener, UdpSocket},
    thread::sleep,
    time::Duration,
};

use ipnet::IpNet;
use sentinel::kernel::{
    NewRule, Upsert,
    steer::{SteerProtocol, SteerTarget, TestLookup, TestVerdict, socket_cookie},
};
use sentinel_tests::harness::Harness;

/// `SK_PASS`: the program never drops.
const SK_PASS: u32 = 1;

macro_rules! require_root {
    () => {
        if sentinel_tests::skip_unless_root("needs root to load BPF programs") {
            return;
        }
    };
}

fn target(prefix: &str, ports: (u16, u16), slot: u32) -> SteerTarget {
    SteerTarget {
        prefix: prefix.parse().unwrap(),
        ports,
        protocol: SteerProtocol::Tcp,
        slot,
    }
}

fn tcp(remote: &str, local: &str, local_port: u16) -> TestLookup {
    TestLookup {
        protocol: SteerProtocol::Tcp,
        remote: remote.parse().unwrap(),
        remote_port: 40000,
        local: local.parse().unwrap(),
        local_port,
    }
}

fn run(h: &Harness, lookup: TestLookup) -> Option<u64> {
    let TestVerdict { action, cookie } = h.kernel.steer_test_run(&lookup).expect("test run");
    assert_eq!(action, SK_PASS, "the program never drops");
    cookie
}

/// A listening TCP socket (loopback, port 0) and its cookie.
fn listener(addr: &str) -> (TcpListener, u64) {
    let l = TcpListener::bind((addr.parse::<IpAddr>().unwrap(), 0)).unwrap();
    let cookie = socket_cookie(&l).unwrap();
    (l, cookie)
}

fn watch(h: &mut Harness, prefix: &str, ttl: Option<Duration>) -> Upsert {
    let prefix: IpNet = prefix.parse().unwrap();
    h.kernel
        .steering
        .watch_upsert(
            &prefix,
            &NewRule {
                ttl,
                source: "test".into(),
                reason: "test".into(),
            },
        )
        .unwrap()
}

#[test]
fn without_rules_nothing_is_steered() {
    require_root!();
    let h = Harness::new();
    assert_eq!(run(&h, tcp("192.0.2.10", "198.51.100.1", 80)), None);
    assert!(h.kernel.steering.stats().is_empty());
}

#[test]
fn a_rule_steers_its_prefix_ports_and_protocol_only() {
    require_root!();
    let mut h = Harness::new();
    let (l, cookie) = listener("127.0.0.1");
    h.kernel.steering.set_socket(0, &l).unwrap();
    h.kernel
        .steering
        .set_rules(&[target("198.51.100.0/24", (1000, 2000), 0)], None)
        .unwrap();
    for port in [1000, 1500, 2000] {
        assert_eq!(
            run(&h, tcp("192.0.2.10", "198.51.100.7", port)),
            Some(cookie)
        );
    }
    // Outside the range, the prefix, the protocol or the family: untouched.
    assert_eq!(run(&h, tcp("192.0.2.10", "198.51.100.7", 999)), None);
    assert_eq!(run(&h, tcp("192.0.2.10", "198.51.100.7", 2001)), None);
    assert_eq!(run(&h, tcp("192.0.2.10", "198.51.101.7", 1500)), None);
    let mut udp = tcp("192.0.2.10", "198.51.100.7", 1500);
    udp.protocol = SteerProtocol::Udp;
    assert_eq!(run(&h, udp), None);
    assert_eq!(run(&h, tcp("2001:db8::1", "2001:db8::2", 1500)), None);
    let stats = h.kernel.steering.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].slot, stats[0].rule), (0, 3));
}

#[test]
fn ipv6_and_udp_rules() {
    require_root!();
    let mut h = Harness::new();
    let (l6, cookie6) = listener("::1");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_cookie = socket_cookie(&udp).unwrap();
    h.kernel.steering.set_socket(0, &l6).unwrap();
    h.kernel.steering.set_socket(1, &udp).unwrap();
    let mut dns = target("198.51.100.0/24", (53, 53), 1);
    dns.protocol = SteerProtocol::Udp;
    h.kernel
        .steering
        .set_rules(&[target("2001:db8:2::/48", (1, 65535), 0), dns], None)
        .unwrap();
    assert_eq!(
        run(&h, tcp("2001:db8:1::10", "2001:db8:2::1", 443)),
        Some(cookie6)
    );
    assert_eq!(run(&h, tcp("2001:db8:1::10", "2001:db8:3::1", 443)), None);
    let mut query = tcp("192.0.2.10", "198.51.100.53", 53);
    query.protocol = SteerProtocol::Udp;
    assert_eq!(run(&h, query), Some(udp_cookie));
}

#[test]
fn the_most_specific_rule_wins_whatever_the_order() {
    require_root!();
    let mut h = Harness::new();
    let (wide, wide_cookie) = listener("127.0.0.1");
    let (narrow, narrow_cookie) = listener("127.0.0.1");
    h.kernel.steering.set_socket(0, &wide).unwrap();
    h.kernel.steering.set_socket(1, &narrow).unwrap();
    h.kernel
        .steering
        .set_rules(
            &[
                target("198.51.100.0/24", (1, 65535), 0),
                target("198.51.100.7/32", (8000, 8999), 1),
            ],
            None,
        )
        .unwrap();
    let to = |port| run(&h, tcp("192.0.2.10", "198.51.100.7", port));
    assert_eq!(to(8080), Some(narrow_cookie));
    assert_eq!(to(9000), Some(wide_cookie));
    assert_eq!(
        run(&h, tcp("192.0.2.10", "198.51.100.8", 8080)),
        Some(wide_cookie)
    );
}

#[test]
fn watchlisted_sources_go_to_quarantine_until_their_entry_expires() {
    require_root!();
    let mut h = Harness::new();
    let (main, main_cookie) = listener("127.0.0.1");
    let (quarantine, quarantine_cookie) = listener("127.0.0.1");
    h.kernel.steering.set_socket(0, &main).unwrap();
    h.kernel.steering.set_socket(1, &quarantine).unwrap();
    h.kernel
        .steering
        .set_rules(&[target("198.51.100.0/24", (80, 80), 0)], Some(1))
        .unwrap();
    assert_eq!(watch(&mut h, "192.0.2.0/28", None), Upsert::Created);
    assert_eq!(
        watch(
            &mut h,
            "2001:db8:bad::/48",
            Some(Duration::from_millis(200))
        ),
        Upsert::Created
    );
    let suspect = tcp("192.0.2.10", "198.51.100.1", 80);
    assert_eq!(run(&h, suspect), Some(quarantine_cookie));
    assert_eq!(run(&h, suspect), Some(quarantine_cookie));
    assert_eq!(
        run(&h, tcp("192.0.2.16", "198.51.100.1", 80)),
        Some(main_cookie)
    );
    // A watchlisted source to a destination no rule names is not captured.
    assert_eq!(run(&h, tcp("192.0.2.10", "198.51.100.1", 81)), None);
    let entry = h
        .kernel
        .steering
        .watch_get(&"192.0.2.0/28".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(entry.hits, 2);
    assert!(entry.last_hit_ns > 0);

    // IPv6 entries with a TTL: steered while live, not once expired (the
    // kernel's clock decides; nothing has reaped the entry).
    let (main6, main6_cookie) = listener("::1");
    let (quarantine6, quarantine6_cookie) = listener("::1");
    h.kernel.steering.set_socket(2, &main6).unwrap();
    h.kernel.steering.set_socket(3, &quarantine6).unwrap();
    h.kernel
        .steering
        .set_rules(&[target("2001:db8:2::/48", (80, 80), 2)], Some(3))
        .unwrap();
    let suspect6 = tcp("2001:db8:bad::1", "2001:db8:2::1", 80);
    assert_eq!(run(&h, suspect6), Some(quarantine6_cookie));
    sleep(Duration::from_millis(300));
    assert_eq!(run(&h, suspect6), Some(main6_cookie));
    assert!(
        h.kernel
            .steering
            .watch_get(&"2001:db8:bad::/48".parse().unwrap())
            .unwrap()
            .is_some(),
        "expired, not yet reaped"
    );
    let stats = h.kernel.steering.stats();
    let slot = |n| stats.iter().find(|s| s.slot == n).copied().unwrap();
    assert_eq!(slot(1).watchlist, 2);
    assert_eq!(slot(3).watchlist, 1);
    assert_eq!(slot(2).rule, 1);

    // Removing the entry stops quarantine at once.
    assert!(
        h.kernel
            .steering
            .watch_remove(&"192.0.2.0/28".parse().unwrap())
            .unwrap()
    );
    h.kernel
        .steering
        .set_rules(&[target("198.51.100.0/24", (80, 80), 0)], Some(1))
        .unwrap();
    assert_eq!(run(&h, suspect), Some(main_cookie));
    let reaped = h.kernel.steering.watch_reap(u64::MAX).unwrap();
    assert_eq!(reaped, vec!["2001:db8:bad::/48".parse::<IpNet>().unwrap()]);
    assert!(h.kernel.steering.watch_entries().unwrap().is_empty());
}

#[test]
fn an_empty_slot_falls_back_to_the_normal_lookup() {
    require_root!();
    let mut h = Harness::new();
    let (l, cookie) = listener("127.0.0.1");
    h.kernel
        .steering
        .set_rules(&[target("198.51.100.0/24", (80, 80), 5)], None)
        .unwrap();
    let lookup = tcp("192.0.2.10", "198.51.100.1", 80);
    assert_eq!(run(&h, lookup), None);
    h.kernel.steering.set_socket(5, &l).unwrap();
    assert_eq!(run(&h, lookup), Some(cookie));
    h.kernel.steering.clear_socket(5).unwrap();
    h.kernel.steering.clear_socket(5).unwrap();
    assert_eq!(run(&h, lookup), None);
    let stats = h.kernel.steering.stats();
    assert_eq!(
        (stats[0].slot, stats[0].rule, stats[0].no_socket),
        (5, 1, 2)
    );
}

#[test]
fn a_reload_swaps_the_rule_set_whole() {
    require_root!();
    let mut h = Harness::new();
    let (l, cookie) = listener("127.0.0.1");
    h.kernel.steering.set_socket(0, &l).unwrap();
    h.kernel
        .steering
        .set_rules(&[target("198.51.100.0/24", (8000, 8001), 0)], None)
        .unwrap();
    let to = |h: &Harness, port| run(h, tcp("192.0.2.10", "198.51.100.1", port));
    assert_eq!(to(&h, 8001), Some(cookie));
    assert_eq!(to(&h, 8002), None);
    h.kernel
        .steering
        .set_rules(&[target("198.51.100.0/24", (8002, 8002), 0)], None)
        .unwrap();
    assert_eq!(to(&h, 8001), None);
    assert_eq!(to(&h, 8002), Some(cookie));
    h.kernel.steering.set_rules(&[], None).unwrap();
    assert_eq!(to(&h, 8002), None);
    assert_eq!(h.kernel.steering.rule_count().unwrap(), 0);
}

#[test]
fn bad_rule_sets_are_refused_not_truncated() {
    require_root!();
    let mut h = Harness::new();
    let many: Vec<_> = (0..65)
        .map(|i| target("198.51.100.0/24", (i, i), 0))
        .collect();
    assert!(h.kernel.steering.set_rules(&many, None).is_err());
    assert!(
        h.kernel
            .steering
            .set_rules(&[target("198.51.100.0/24", (1, 1), 64)], None)
            .is_err()
    );
    assert!(h.kernel.steering.set_rules(&[], Some(64)).is_err());
    let mixed = TestLookup {
        local: "2001:db8::1".parse().unwrap(),
        ..tcp("192.0.2.1", "198.51.100.1", 80)
    };
    assert!(h.kernel.steer_test_run(&mixed).is_err());
}
