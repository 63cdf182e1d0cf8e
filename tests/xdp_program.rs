//! Every branch of the XDP program, through `BPF_PROG_TEST_RUN` on crafted
//! frames: the verdict (action) and the reason it was counted under.
//!
//! Needs root (loading BPF programs); without it each test says SKIPPED.

use std::{net::Ipv6Addr, thread::sleep, time::Duration};

use sentinel::{config::PortPolicy, net::RuleList};
use sentinel_tests::{
    harness::{Harness, XDP_DROP, XDP_PASS},
    packet::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, Ext, IPPROTO_ICMPV6, Packet},
};

macro_rules! require_root {
    () => {
        if sentinel_tests::skip_unless_root("needs root to load BPF programs") {
            return;
        }
    };
}

const SRC4: [u8; 4] = [192, 0, 2, 10];
const DST4: [u8; 4] = [198, 51, 100, 1];

fn src6() -> Ipv6Addr {
    "2001:db8:1::10".parse().unwrap()
}
fn dst6() -> Ipv6Addr {
    "2001:db8:2::1".parse().unwrap()
}

fn v4() -> Packet {
    Packet::ipv4(SRC4, DST4)
}
fn v6() -> Packet {
    Packet::ipv6(src6(), dst6())
}

fn pass(reason: &str) -> (u32, String) {
    (XDP_PASS, reason.to_owned())
}
fn drop(reason: &str) -> (u32, String) {
    (XDP_DROP, reason.to_owned())
}

#[test]
fn ipv4_hit_and_miss() {
    require_root!();
    let mut h = Harness::new();
    let frame = v4().tcp(40000, 80).build();
    assert_eq!(h.run(&frame), pass("pass"));
    h.deny("192.0.2.10/32");
    assert_eq!(h.run(&frame), drop("denylist"));
    let other = Packet::ipv4([192, 0, 2, 11], DST4).tcp(40000, 80).build();
    assert_eq!(h.run(&other), pass("pass"));
    // The destination is not what the denylist matches.
    let reverse = Packet::ipv4(DST4, SRC4).tcp(80, 40000).build();
    assert_eq!(h.run(&reverse), pass("pass"));
}

#[test]
fn ipv6_hit_and_miss() {
    require_root!();
    let mut h = Harness::new();
    let frame = v6().tcp(40000, 443).build();
    assert_eq!(h.run(&frame), pass("pass"));
    h.deny("2001:db8:1::/48");
    assert_eq!(h.run(&frame), drop("denylist"));
    let other = Packet::ipv6("2001:db8:9::1".parse::<Ipv6Addr>().unwrap(), dst6())
        .tcp(1, 443)
        .build();
    assert_eq!(h.run(&other), pass("pass"));
    // An IPv4 entry never matches IPv6 traffic and the reverse.
    let mut h = Harness::new();
    h.deny("192.0.2.0/24");
    assert_eq!(h.run(&frame), pass("pass"));
}

#[test]
fn longest_prefix_gets_the_hit() {
    require_root!();
    let mut h = Harness::new();
    h.deny("192.0.2.0/24");
    h.deny("192.0.2.10/32");
    let frame = v4().udp(1, 53).build();
    for _ in 0..3 {
        assert_eq!(h.run(&frame), drop("denylist"));
    }
    let neighbour = Packet::ipv4([192, 0, 2, 99], DST4).udp(1, 53).build();
    assert_eq!(h.run(&neighbour), drop("denylist"));
    let host = h.entry(RuleList::Deny, "192.0.2.10/32").unwrap();
    let net = h.entry(RuleList::Deny, "192.0.2.0/24").unwrap();
    assert_eq!(host.hits, 3);
    assert_eq!(net.hits, 1);
    assert!(host.last_hit_ns > 0 && net.last_hit_ns > 0);
}

#[test]
fn allowlist_wins_over_denylist() {
    require_root!();
    let mut h = Harness::new();
    h.deny("192.0.2.0/24");
    h.allow("192.0.2.10/32");
    assert_eq!(h.run(&v4().tcp(1, 22).build()), pass("allowlist"));
    let other = Packet::ipv4([192, 0, 2, 11], DST4).tcp(1, 22).build();
    assert_eq!(h.run(&other), drop("denylist"));
    // Also over the port policy.
    h.kernel
        .set_port_policy(&PortPolicy {
            deny_tcp: vec![(22, 22)],
            deny_udp: vec![],
        })
        .unwrap();
    assert_eq!(h.run(&v4().tcp(1, 22).build()), pass("allowlist"));
    assert_eq!(h.allow_hits("192.0.2.10/32"), 2);
    // IPv6 allowlist likewise.
    h.deny("2001:db8:1::/48");
    h.allow("2001:db8:1::10/128");
    assert_eq!(h.run(&v6().udp(1, 53).build()), pass("allowlist"));
}

trait AllowHits {
    fn allow_hits(&mut self, prefix: &str) -> u64;
}
impl AllowHits for Harness {
    fn allow_hits(&mut self, prefix: &str) -> u64 {
        self.entry(RuleList::Allow, prefix).unwrap().hits
    }
}

#[test]
fn vlan_tags() {
    require_root!();
    let mut h = Harness::new();
    h.deny("192.0.2.10/32");
    h.deny("2001:db8:1::/48");
    for tags in [
        vec![ETH_P_8021Q],
        vec![ETH_P_8021AD, ETH_P_8021Q],
        vec![ETH_P_8021Q, ETH_P_8021Q],
    ] {
        let mut p4 = v4().tcp(1, 80);
        let mut p6 = v6().tcp(1, 80);
        for t in &tags {
            p4 = p4.vlan(*t);
            p6 = p6.vlan(*t);
        }
        assert_eq!(h.run(&p4.build()), drop("denylist"), "tags {tags:x?}");
        assert_eq!(h.run(&p6.build()), drop("denylist"), "tags {tags:x?}");
    }
    // A third tag is beyond what the program unwraps: passed uninspected.
    let triple = v4()
        .vlan(ETH_P_8021AD)
        .vlan(ETH_P_8021Q)
        .vlan(ETH_P_8021Q)
        .tcp(1, 80);
    assert_eq!(h.run(&triple.build()), pass("pass"));
}

#[test]
fn ipv4_options_shift_the_transport_header() {
    require_root!();
    let mut h = Harness::new();
    h.kernel
        .set_port_policy(&PortPolicy {
            deny_tcp: vec![(443, 443)],
            deny_udp: vec![],
        })
        .unwrap();
    for words in 0..=10u8 {
        let denied = v4().ipv4_options(words).tcp(40000, 443).build();
        assert_eq!(h.run(&denied), drop("port"), "{words} option words");
        let allowed = v4().ipv4_options(words).tcp(443, 8443).build();
        assert_eq!(h.run(&allowed), pass("pass"), "{words} option words");
    }
}

#[test]
fn malformed_network_headers() {
    require_root!();
    let mut h = Harness::new();
    h.deny("192.0.2.10/32");
    // IHL below 5, and a version that is not 4 under an IPv4 ethertype.
    for byte in [0x44, 0x40, 0x65] {
        let frame = v4().ipv4_version_ihl(byte).tcp(1, 80).build();
        assert_eq!(h.run(&frame), pass("malformed"), "version/ihl {byte:#x}");
    }
    let frame = v6().ipv6_version(4).tcp(1, 80).build();
    assert_eq!(h.run(&frame), pass("malformed"));
    // IHL larger than the frame: the transport read finds no header.
    let mut h = Harness::new();
    let frame = v4().ipv4_version_ihl(0x4f).tcp(1, 80).build();
    assert_eq!(h.run(&frame), pass("malformed"));
    // ... but a denied source is still dropped: its address is known.
    h.deny("192.0.2.10/32");
    assert_eq!(h.run(&frame), drop("denylist"));
}

#[test]
fn ipv6_extension_headers() {
    require_root!();
    let mut h = Harness::new();
    h.kernel
        .set_port_policy(&PortPolicy {
            deny_tcp: vec![],
            deny_udp: vec![(53, 53)],
        })
        .unwrap();
    let chains: Vec<Vec<Ext>> = vec![
        vec![Ext::HopByHop { len8: 0 }],
        vec![Ext::Routing { len8: 2 }],
        vec![Ext::DestOpts { len8: 1 }],
        vec![Ext::Auth { len4: 4 }],
        vec![Ext::Fragment {
            offset: 0,
            more: true,
        }],
        vec![
            Ext::HopByHop { len8: 1 },
            Ext::DestOpts { len8: 0 },
            Ext::Routing { len8: 0 },
            Ext::Fragment {
                offset: 0,
                more: true,
            },
            Ext::Auth { len4: 1 },
            Ext::DestOpts { len8: 3 },
        ],
    ];
    for chain in chains {
        let mut p = v6();
        for e in &chain {
            p = p.ext(*e);
        }
        assert_eq!(
            h.run(&p.clone().udp(1, 53).build()),
            drop("port"),
            "{chain:?}"
        );
        assert_eq!(h.run(&p.udp(1, 54).build()), pass("pass"), "{chain:?}");
    }
    // Eight extension headers are walked; a ninth is too deep.
    let mut deep = v6();
    for _ in 0..8 {
        deep = deep.ext(Ext::DestOpts { len8: 0 });
    }
    assert_eq!(h.run(&deep.clone().udp(1, 53).build()), pass("malformed"));
    // A non-TCP/UDP upper layer has no ports: passed.
    assert_eq!(
        h.run(&v6().protocol(IPPROTO_ICMPV6).payload(8).build()),
        pass("pass")
    );
    // Denied sources are dropped whatever the chain.
    h.deny("2001:db8:1::10/128");
    assert_eq!(h.run(&deep.udp(1, 53).build()), drop("denylist"));
}

#[test]
fn fragments() {
    require_root!();
    let mut h = Harness::new();
    h.kernel
        .set_port_policy(&PortPolicy {
            deny_tcp: vec![],
            deny_udp: vec![(53, 53)],
        })
        .unwrap();
    // First fragments carry the transport header: the port policy applies.
    assert_eq!(
        h.run(&v4().ipv4_fragment(0, true).udp(1, 53).build()),
        drop("port")
    );
    // Later fragments have no ports: decided on addresses alone. The bytes
    // where a header would be are payload and must not be read as one.
    let later4 = v4().ipv4_fragment(185, false).udp(1, 53).build();
    assert_eq!(h.run(&later4), pass("pass"));
    let later6 = v6()
        .ext(Ext::Fragment {
            offset: 185,
            more: true,
        })
        .udp(1, 53)
        .build();
    assert_eq!(h.run(&later6), pass("pass"));
    let first6 = v6()
        .ext(Ext::Fragment {
            offset: 0,
            more: true,
        })
        .udp(1, 53)
        .build();
    assert_eq!(h.run(&first6), drop("port"));
    h.deny("192.0.2.10/32");
    h.deny("2001:db8:1::10/128");
    assert_eq!(h.run(&later4), drop("denylist"));
    assert_eq!(h.run(&later6), drop("denylist"));
}

#[test]
fn port_policy() {
    require_root!();
    let mut h = Harness::new();
    h.kernel
        .set_port_policy(&PortPolicy {
            deny_tcp: vec![(23, 23), (6000, 6063)],
            deny_udp: vec![(19, 19), (65535, 65535)],
        })
        .unwrap();
    for port in [23, 6000, 6031, 6063] {
        assert_eq!(
            h.run(&v4().tcp(1, port).build()),
            drop("port"),
            "tcp {port}"
        );
        assert_eq!(
            h.run(&v6().tcp(1, port).build()),
            drop("port"),
            "tcp6 {port}"
        );
        assert_eq!(
            h.run(&v4().udp(1, port).build()),
            pass("pass"),
            "udp {port}"
        );
    }
    for port in [22, 5999, 6064] {
        assert_eq!(
            h.run(&v4().tcp(1, port).build()),
            pass("pass"),
            "tcp {port}"
        );
    }
    assert_eq!(h.run(&v4().udp(1, 19).build()), drop("port"));
    assert_eq!(h.run(&v4().udp(1, 65535).build()), drop("port"));
    assert_eq!(h.run(&v4().tcp(1, 19).build()), pass("pass"));
    // The source port is not what the policy matches.
    assert_eq!(h.run(&v4().tcp(23, 80).build()), pass("pass"));
    // ICMP has no ports.
    assert_eq!(h.run(&v4().payload(8).build()), pass("pass"));
    // Replacing the policy clears what is no longer listed.
    h.kernel.set_port_policy(&PortPolicy::default()).unwrap();
    assert_eq!(h.run(&v4().tcp(1, 23).build()), pass("pass"));
}

#[test]
fn non_ip_frames_pass() {
    require_root!();
    let mut h = Harness::new();
    h.deny("192.0.2.0/24");
    assert_eq!(
        h.run(&Packet::ethertype(ETH_P_ARP).payload(28).build()),
        pass("pass")
    );
}

#[test]
fn expired_entries_never_drop() {
    require_root!();
    let mut h = Harness::new();
    let frame = v4().tcp(1, 80).build();
    h.add(
        RuleList::Deny,
        "192.0.2.10/32",
        Some(Duration::from_millis(300)),
    )
    .unwrap();
    assert_eq!(h.run(&frame), drop("denylist"));
    sleep(Duration::from_millis(400));
    // Still in the map (nothing reaped it), but the program ignores it.
    assert!(h.entry(RuleList::Deny, "192.0.2.10/32").is_some());
    assert_eq!(h.run(&frame), pass("pass"));

    // An expired longer prefix does not hide a live shorter one.
    h.deny("192.0.2.0/24");
    assert_eq!(h.run(&frame), drop("denylist"));
    assert_eq!(h.entry(RuleList::Deny, "192.0.2.0/24").unwrap().hits, 1);

    // Several expired layers over a live one.
    let mut h = Harness::new();
    h.deny("192.0.0.0/16");
    for prefix in [
        "192.0.2.0/24",
        "192.0.2.0/28",
        "192.0.2.8/30",
        "192.0.2.10/32",
    ] {
        h.add(RuleList::Deny, prefix, Some(Duration::from_millis(200)))
            .unwrap();
    }
    sleep(Duration::from_millis(300));
    assert_eq!(h.run(&frame), drop("denylist"));
    assert_eq!(h.entry(RuleList::Deny, "192.0.0.0/16").unwrap().hits, 1);
    // Expired allowlist entries do not allow either.
    let mut h = Harness::new();
    h.deny("192.0.2.0/24");
    h.add(
        RuleList::Allow,
        "192.0.2.10/32",
        Some(Duration::from_millis(200)),
    )
    .unwrap();
    sleep(Duration::from_millis(300));
    assert_eq!(h.run(&frame), drop("denylist"));
}

/// Cuts frames at every length from the Ethernet header to the whole frame:
/// no cut may be read out of bounds (the verifier guarantees it; this checks
/// the verdicts), and each is counted as malformed until the headers the
/// program needs are whole.
#[test]
fn truncated_at_every_boundary() {
    require_root!();
    let mut h = Harness::new();
    h.kernel
        .set_port_policy(&PortPolicy {
            deny_tcp: vec![(443, 443)],
            deny_udp: vec![(53, 53)],
        })
        .unwrap();
    let cases = [
        v4().vlan(ETH_P_8021AD)
            .vlan(ETH_P_8021Q)
            .ipv4_options(3)
            .tcp(1, 443),
        v6().vlan(ETH_P_8021Q)
            .ext(Ext::HopByHop { len8: 1 })
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .udp(1, 53),
    ];
    for packet in cases {
        let frame = packet.build();
        let boundaries = packet.boundaries();
        assert!(boundaries.len() > 10);
        // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet
        // header, so cuts start there.
        for len in 14..frame.len() {
            let (action, reason) = h.run(&frame[..len]);
            assert_eq!(
                (action, reason.as_str()),
                (XDP_PASS, "malformed"),
                "cut at {len} of {} ({})",
                frame.len(),
                if boundaries.contains(&len) {
                    "header boundary"
                } else {
                    "mid-header"
                }
            );
        }
        assert_eq!(h.run(&frame), drop("port"));
    }
    // With the source denied, cuts after the network header drop.
    h.deny("192.0.2.10/32");
    let packet = v4().vlan(ETH_P_8021Q).ipv4_options(2).tcp(1, 80);
    let frame = packet.build();
    let network_end = 14 + 4 + 20;
    for len in 14..=frame.len() {
        let expected = if len >= network_end {
            drop("denylist")
        } else {
            pass("malformed")
        };
        assert_eq!(h.run(&frame[..len]), expected, "cut at {len}");
    }
}

#[test]
fn allow_prefix_beats_deny_host() {
    require_root!();
    let mut h = Harness::new();
    h.deny("192.0.2.10/32");
    h.allow("192.0.2.0/24");
    assert_eq!(h.run(&v4().tcp(1, 80).build()), pass("allowlist"));
    h.deny("2001:db8:1::10/128");
    h.allow("2001:db8:1::/48");
    assert_eq!(h.run(&v6().tcp(1, 80).build()), pass("allowlist"));
}

/// The program skips maps userspace marks empty: the mark must follow the
/// first add and the last remove of each map, or entries would be ignored.
#[test]
fn emptied_and_refilled_maps_are_looked_up_again() {
    require_root!();
    let mut h = Harness::new();
    let frame = v4().tcp(1, 80).build();
    for prefix in ["192.0.2.10/32", "192.0.2.0/24"] {
        let parsed = prefix.parse().unwrap();
        for _ in 0..2 {
            h.deny(prefix);
            assert_eq!(h.run(&frame), drop("denylist"), "{prefix} added");
            assert!(h.kernel.tables.remove(RuleList::Deny, &parsed).unwrap());
            assert_eq!(h.run(&frame), pass("pass"), "{prefix} removed");
        }
    }
}
