//! The prefix indexes through `BPF_PROG_TEST_RUN`: every branch of the
//! IPv4 lookup (direct table, long-prefix probes, parents past expired
//! rules) with both table sizes, the IPv6 filter (classes, lengths under
//! /32, the host gate), and the order of the lists.
//!
//! Needs root (loading BPF programs); without it each test says SKIPPED.

use std::{net::Ipv6Addr, thread::sleep, time::Duration};

use sentinel::net::RuleList;
use sentinel_tests::{
    harness::{Harness, XDP_DROP, XDP_PASS},
    packet::Packet,
};

macro_rules! require_root {
    () => {
        if sentinel_tests::skip_unless_root("needs root to load BPF programs") {
            return;
        }
    };
}

const DST4: [u8; 4] = [198, 51, 100, 1];

fn from4(src: [u8; 4]) -> Vec<u8> {
    Packet::ipv4(src, DST4).udp(40_000, 53).build()
}

fn from6(src: &str) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().expect("address");
    let dst: Ipv6Addr = "2001:db8:ffff::1".parse().expect("address");
    Packet::ipv6(src, dst).udp(40_000, 53).build()
}

fn pass(reason: &str) -> (u32, String) {
    (XDP_PASS, reason.to_owned())
}

fn dropped() -> (u32, String) {
    (XDP_DROP, "denylist".to_owned())
}

fn hits(h: &mut Harness, list: RuleList, prefix: &str) -> u64 {
    h.entry(list, prefix)
        .unwrap_or_else(|| panic!("{prefix} is not in the {list}"))
        .hits
}

/// A kernel whose IPv4 denylist has the large direct table (24 bits) and
/// one whose has the small one (16 bits: capacities up to 131,071).
fn both_tables() -> [Harness; 2] {
    [
        Harness::new(),
        Harness::with_config(|c| c.capacity.denylist_v4 = 1_000),
    ]
}

#[test]
fn longest_rule_wins_across_the_direct_table_edge() {
    require_root!();
    for mut h in both_tables() {
        for prefix in [
            "192.0.0.0/16",
            "192.0.2.0/24",
            "192.0.2.0/28",
            "192.0.2.8/30",
            "192.0.2.64/26",
        ] {
            h.deny(prefix);
        }
        let cases: [([u8; 4], &str); 6] = [
            ([192, 0, 2, 9], "192.0.2.8/30"),
            ([192, 0, 2, 3], "192.0.2.0/28"),
            ([192, 0, 2, 70], "192.0.2.64/26"),
            ([192, 0, 2, 200], "192.0.2.0/24"),
            ([192, 0, 7, 1], "192.0.0.0/16"),
            ([192, 0, 255, 255], "192.0.0.0/16"),
        ];
        for (src, _) in cases {
            assert_eq!(h.run(&from4(src)), dropped(), "{src:?}");
        }
        for (_, prefix) in cases {
            let expected = cases.iter().filter(|(_, p)| *p == prefix).count() as u64;
            assert_eq!(hits(&mut h, RuleList::Deny, prefix), expected, "{prefix}");
            assert!(h.entry(RuleList::Deny, prefix).unwrap().last_hit_ns > 0);
        }
        assert_eq!(h.run(&from4([192, 1, 0, 1])), pass("pass"));
        assert_eq!(h.run(&from4([191, 255, 255, 255])), pass("pass"));
    }
}

#[test]
fn expired_rules_fall_back_through_several_levels() {
    require_root!();
    for mut h in both_tables() {
        h.deny("192.0.0.0/8");
        h.deny("192.0.0.0/20");
        let ttl = Some(Duration::from_millis(250));
        // Expired rules above and below the table's edge, for both tables.
        for prefix in [
            "192.0.0.0/16",
            "192.0.2.0/24",
            "192.0.2.0/25",
            "192.0.2.8/29",
            "192.0.2.8/31",
        ] {
            h.add(RuleList::Deny, prefix, ttl).expect("add");
        }
        let frame = from4([192, 0, 2, 9]);
        assert_eq!(h.run(&frame), dropped());
        assert_eq!(hits(&mut h, RuleList::Deny, "192.0.2.8/31"), 1);
        sleep(Duration::from_millis(350));
        // Past four expired rules to the live /20, and past the expired /16
        // to the /8 outside the /20.
        assert_eq!(h.run(&frame), dropped());
        assert_eq!(hits(&mut h, RuleList::Deny, "192.0.0.0/20"), 1);
        assert_eq!(h.run(&from4([192, 0, 200, 1])), dropped());
        assert_eq!(hits(&mut h, RuleList::Deny, "192.0.0.0/8"), 1);
        assert_eq!(hits(&mut h, RuleList::Deny, "192.0.2.8/31"), 1);
        // With every live cover gone, nothing drops.
        for prefix in ["192.0.0.0/8", "192.0.0.0/20"] {
            assert!(
                h.kernel
                    .tables
                    .remove(RuleList::Deny, &prefix.parse().unwrap())
                    .unwrap()
            );
        }
        assert_eq!(h.run(&frame), pass("pass"));
    }
}

#[test]
fn removing_a_rule_restores_the_one_it_covered() {
    require_root!();
    for mut h in both_tables() {
        h.deny("198.18.0.0/15");
        h.deny("198.18.7.0/24");
        h.deny("198.18.7.16/28");
        let in_28 = from4([198, 18, 7, 17]);
        let in_24 = from4([198, 18, 7, 200]);
        let remove = |h: &mut Harness, p: &str| {
            assert!(
                h.kernel
                    .tables
                    .remove(RuleList::Deny, &p.parse().unwrap())
                    .unwrap()
            );
        };
        remove(&mut h, "198.18.7.0/24");
        assert_eq!(h.run(&in_24), dropped());
        assert_eq!(hits(&mut h, RuleList::Deny, "198.18.0.0/15"), 1);
        assert_eq!(h.run(&in_28), dropped());
        assert_eq!(hits(&mut h, RuleList::Deny, "198.18.7.16/28"), 1);
        remove(&mut h, "198.18.7.16/28");
        assert_eq!(h.run(&in_28), dropped());
        assert_eq!(hits(&mut h, RuleList::Deny, "198.18.0.0/15"), 2);
        h.deny("198.18.7.16/28");
        remove(&mut h, "198.18.0.0/15");
        assert_eq!(h.run(&in_24), pass("pass"));
        assert_eq!(h.run(&in_28), dropped());
        remove(&mut h, "198.18.7.16/28");
        assert_eq!(h.run(&in_28), pass("pass"));
    }
}

#[test]
fn short_prefixes_cover_their_whole_range() {
    require_root!();
    for mut h in both_tables() {
        h.deny("128.0.0.0/1");
        h.deny("10.0.0.0/8");
        for src in [[128, 0, 0, 0], [255, 255, 255, 254], [192, 0, 2, 1]] {
            assert_eq!(h.run(&from4(src)), dropped(), "{src:?} in 128.0.0.0/1");
        }
        assert_eq!(h.run(&from4([10, 255, 0, 1])), dropped());
        assert_eq!(h.run(&from4([11, 0, 0, 1])), pass("pass"));
        assert_eq!(hits(&mut h, RuleList::Deny, "128.0.0.0/1"), 3);
        // The allowlist may hold /0: it then passes everything first.
        h.allow("0.0.0.0/0");
        assert_eq!(h.run(&from4([10, 1, 1, 1])), pass("allowlist"));
        assert_eq!(h.run(&from4([200, 1, 1, 1])), pass("allowlist"));
        assert!(
            h.kernel
                .tables
                .remove(RuleList::Deny, &"128.0.0.0/1".parse().unwrap())
                .unwrap()
        );
        assert!(
            h.kernel
                .tables
                .remove(RuleList::Allow, &"0.0.0.0/0".parse().unwrap())
                .unwrap()
        );
        assert_eq!(h.run(&from4([200, 1, 1, 1])), pass("pass"));
        assert_eq!(h.run(&from4([10, 1, 1, 1])), dropped());
    }
}

#[test]
fn ipv6_lengths_present_and_absent() {
    require_root!();
    let mut h = Harness::new();
    h.deny("2001:db8:1::/48");
    assert_eq!(h.run(&from6("2001:db8:1::9")), dropped());
    // Same /32, so the same filter slot with the /48's class set, but not
    // inside the /48: the probe misses.
    assert_eq!(h.run(&from6("2001:db8:2::9")), pass("pass"));
    // A /79 shares the /48's class (lengths 31 apart do); a /127 has the
    // class of /33, /64 and /95.
    h.deny("2001:db8:3:0:2::/79");
    h.deny("2001:db8:4::/127");
    assert_eq!(h.run(&from6("2001:db8:3:0:3::1")), dropped());
    assert_eq!(h.run(&from6("2001:db8:3::1")), pass("pass"));
    assert_eq!(h.run(&from6("2001:db8:4::1")), dropped());
    assert_eq!(h.run(&from6("2001:db8:4::2")), pass("pass"));
    // A /32 covers the rest of its block; the longer entries keep theirs.
    h.deny("2001:db8::/32");
    assert_eq!(h.run(&from6("2001:db8:2::9")), dropped());
    assert_eq!(h.run(&from6("2001:db8:1::9")), dropped());
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:db8:1::/48"), 2);
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:db8::/32"), 1);
    // Under /32 the filter says nothing: such lengths are probed for
    // every address.
    h.deny("2001:d00::/24");
    assert_eq!(h.run(&from6("2001:dff:1::1")), dropped());
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:d00::/24"), 1);
    assert_eq!(h.run(&from6("2001:e00::1")), pass("pass"));
    // Removing the /48 leaves its addresses to the /32.
    assert!(
        h.kernel
            .tables
            .remove(RuleList::Deny, &"2001:db8:1::/48".parse().unwrap())
            .unwrap()
    );
    assert_eq!(h.run(&from6("2001:db8:1::9")), dropped());
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:db8::/32"), 2);
}

#[test]
fn ipv6_expired_prefixes_fall_back() {
    require_root!();
    let mut h = Harness::new();
    h.deny("2001:d00::/24");
    let ttl = Some(Duration::from_millis(250));
    for prefix in [
        "2001:db8::/32",
        "2001:db8:1::/48",
        "2001:db8:1:2::/64",
        "2001:db8:1:2::/126",
    ] {
        h.add(RuleList::Deny, prefix, ttl).expect("add");
    }
    let frame = from6("2001:db8:1:2::1");
    assert_eq!(h.run(&frame), dropped());
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:db8:1:2::/126"), 1);
    sleep(Duration::from_millis(350));
    assert_eq!(h.run(&frame), dropped());
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:d00::/24"), 1);
    assert!(
        h.kernel
            .tables
            .remove(RuleList::Deny, &"2001:d00::/24".parse().unwrap())
            .unwrap()
    );
    assert_eq!(h.run(&frame), pass("pass"));
}

#[test]
fn ipv6_hosts_are_looked_up_through_the_filter() {
    require_root!();
    let mut h = Harness::new();
    // A prefix elsewhere keeps the index populated; the host's slot has
    // only its host bit.
    h.deny("2001:db8:aaaa::/48");
    h.deny("2001:db8:1::10/128");
    assert_eq!(h.run(&from6("2001:db8:1::10")), dropped());
    assert_eq!(h.run(&from6("2001:db8:1::11")), pass("pass"));
    // Host and prefix covering it: the host takes the hit.
    h.deny("2001:db8:1::/64");
    assert_eq!(h.run(&from6("2001:db8:1::10")), dropped());
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:db8:1::10/128"), 2);
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:db8:1::/64"), 0);
    // Removing the host clears its bit; the prefix still covers it.
    assert!(
        h.kernel
            .tables
            .remove(RuleList::Deny, &"2001:db8:1::10/128".parse().unwrap())
            .unwrap()
    );
    assert_eq!(h.run(&from6("2001:db8:1::10")), dropped());
    assert_eq!(hits(&mut h, RuleList::Deny, "2001:db8:1::/64"), 1);
    // Hosts imported in bulk are gated in too.
    let hosts: Vec<ipnet::IpNet> = (1..=50u16)
        .map(|i| format!("2001:db8:{i:x}::{i:x}/128").parse().unwrap())
        .collect();
    let imported = h.kernel.tables.import(
        RuleList::Deny,
        &hosts,
        &sentinel::kernel::NewRule {
            ttl: None,
            source: "test".into(),
            reason: "bulk".into(),
        },
    );
    assert!(imported.stopped.is_none());
    for i in [2u16, 25, 50] {
        assert_eq!(h.run(&from6(&format!("2001:db8:{i:x}::{i:x}"))), dropped());
    }
}

#[test]
fn allowlist_prefixes_come_first() {
    require_root!();
    // The allowlist's IPv4 index has the small table (its default
    // capacity), the denylist's the large one.
    let mut h = Harness::new();
    h.deny("192.0.0.0/16");
    h.deny("192.0.2.10/32");
    h.allow("192.0.2.0/24");
    assert_eq!(h.run(&from4([192, 0, 2, 10])), pass("allowlist"));
    assert_eq!(h.run(&from4([192, 0, 3, 10])), dropped());
    assert_eq!(hits(&mut h, RuleList::Allow, "192.0.2.0/24"), 1);
    assert_eq!(hits(&mut h, RuleList::Deny, "192.0.2.10/32"), 0);
    // An expired allow prefix allows nothing: the denylist decides.
    h.add(
        RuleList::Allow,
        "192.0.3.0/28",
        Some(Duration::from_millis(200)),
    )
    .expect("add");
    assert_eq!(h.run(&from4([192, 0, 3, 1])), pass("allowlist"));
    sleep(Duration::from_millis(300));
    assert_eq!(h.run(&from4([192, 0, 3, 1])), dropped());
    // IPv6 likewise, down to ::/0.
    h.deny("2001:db8::/32");
    h.allow("2001:db8:7::/48");
    assert_eq!(h.run(&from6("2001:db8:7::1")), pass("allowlist"));
    assert_eq!(h.run(&from6("2001:db8:8::1")), dropped());
    h.allow("::/0");
    assert_eq!(h.run(&from6("2001:db8:8::1")), pass("allowlist"));
}

/// The verifier gives up past 1,000,000 instructions; the program must stay
/// well inside that, or a future change to it fails to load on a machine
/// whose verifier explores a little more.
#[test]
fn the_program_verifies_with_headroom() {
    require_root!();
    let h = Harness::new();
    let verified = h
        .kernel
        .verified_instructions()
        .expect("the kernel reports verified_insns");
    eprintln!("the verifier processed {verified} instructions");
    assert!(
        verified < 500_000,
        "the verifier processed {verified} instructions, over half its budget"
    );
}
