//! The kernel maps from userspace: batched import, exact counts, a full map,
//! reaping, persistence across a reload of the program, and refusal of
//! pinned maps with another layout.
//!
//! Needs root (BPF maps); without it each test says SKIPPED.

use std::{thread::sleep, time::Duration};

use ipnet::IpNet;
use sentinel::{
    config::KernelConfig,
    kernel::{Kernel, KernelError, NewRule, Upsert, clock, sys},
    net::RuleList,
};
use sentinel_tests::{
    harness::{Harness, XDP_DROP, XDP_PASS, unique_pin_path},
    packet::Packet,
};

macro_rules! require_root {
    () => {
        if sentinel_tests::skip_unless_root("needs root to create BPF maps") {
            return;
        }
    };
}

fn rule(ttl: Option<Duration>) -> NewRule {
    NewRule {
        ttl,
        source: "test".into(),
        reason: "bulk".into(),
    }
}

fn hosts(n: u32, base: [u8; 2]) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            let b = i.to_be_bytes();
            format!(
                "{}.{}.{}.{}/32",
                base[0],
                base[1].wrapping_add(b[1]),
                b[2],
                b[3]
            )
            .parse()
            .unwrap()
        })
        .collect()
}

#[test]
fn import_counts_new_and_replaced_exactly() {
    require_root!();
    let mut h = Harness::new();
    let first = hosts(20_000, [10, 0]);
    let imported = h.kernel.tables.import(RuleList::Deny, &first, &rule(None));
    assert!(imported.stopped.is_none());
    assert_eq!((imported.created, imported.replaced), (20_000, 0));
    assert_eq!(h.kernel.tables.count(RuleList::Deny), 20_000);

    // Hits on an entry that the next import replaces, and on one it keeps.
    let replaced_src = Packet::ipv4([10, 0, 0x3a, 0x98], [198, 51, 100, 1])
        .tcp(1, 80)
        .build(); // host 15,000
    let kept_src = Packet::ipv4([10, 0, 0, 7], [198, 51, 100, 1])
        .tcp(1, 80)
        .build();
    for _ in 0..3 {
        assert_eq!(h.run(&replaced_src).0, XDP_DROP);
    }
    assert_eq!(h.run(&kept_src).0, XDP_DROP);

    // Overlapping import with a TTL: 10,000 known (replaced in bulk),
    // 10,000 new, and IPv6 mixed in.
    let mut second = hosts(20_000, [10, 0])[10_000..].to_vec();
    second.extend(hosts(10_000, [10, 100]));
    second.push("2001:db8::/32".parse().unwrap());
    let ttl = Some(Duration::from_millis(300));
    let imported = h.kernel.tables.import(RuleList::Deny, &second, &rule(ttl));
    assert!(imported.stopped.is_none());
    assert_eq!((imported.created, imported.replaced), (10_001, 10_000));
    assert_eq!(h.kernel.tables.count(RuleList::Deny), 30_001);
    assert_eq!(
        h.kernel.tables.entries(RuleList::Deny).unwrap().len(),
        30_001
    );
    let replaced = h
        .entry(RuleList::Deny, "10.0.58.152/32")
        .expect("replaced entry");
    assert_eq!(replaced.hits, 3, "bulk replacement keeps hit counts");
    assert_ne!(replaced.expires_at_ns, 0, "and takes the new TTL");

    // The replaced and new entries expire with the TTL; the untouched
    // first half does not.
    sleep(Duration::from_millis(400));
    assert_eq!(h.run(&replaced_src).0, XDP_PASS);
    assert_eq!(h.run(&kept_src).0, XDP_DROP);
    let reaped = h.kernel.tables.reap(clock::now_ns()).unwrap();
    assert_eq!(reaped.len(), 20_001);
    assert_eq!(h.kernel.tables.count(RuleList::Deny), 10_000);
}

#[test]
fn full_map_is_an_error_not_silence() {
    require_root!();
    let mut h = Harness::with_config(|c| c.capacity.denylist_v4 = 100);
    let many = hosts(150, [10, 1]);
    let imported = h.kernel.tables.import(RuleList::Deny, &many, &rule(None));
    assert_eq!(imported.created, 100);
    assert!(matches!(
        imported.stopped,
        Some(KernelError::Full { capacity: 100, .. })
    ));
    assert_eq!(h.kernel.tables.count(RuleList::Deny), 100);
    let err = h.add(RuleList::Deny, "192.0.2.1/32", None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the denylist is full (100 entries): remove entries or raise kernel.capacity.denylist-v4"
    );
    // Prefixes have a map of the same capacity of their own.
    for i in 0..100u32 {
        h.add(RuleList::Deny, &format!("172.16.{i}.0/24"), None)
            .unwrap();
    }
    assert!(matches!(
        h.add(RuleList::Deny, "172.17.0.0/24", None),
        Err(KernelError::Full { capacity: 100, .. })
    ));
    assert_eq!(h.kernel.tables.count(RuleList::Deny), 200);
    // Replacing an existing entry still works when full.
    assert_eq!(
        h.add(RuleList::Deny, "10.1.0.5/32", Some(Duration::from_secs(60)))
            .unwrap(),
        Upsert::Replaced
    );
    // IPv6 has its own capacity.
    assert_eq!(
        h.add(RuleList::Deny, "2001:db8::/32", None).unwrap(),
        Upsert::Created
    );
}

/// An import large enough to be written on several threads stops at a full
/// map exactly as one written in order: the first entries fill it, the
/// rest are refused, and nothing past them is left behind.
#[test]
fn full_map_stops_a_large_import_after_its_first_entries() {
    require_root!();
    let mut h = Harness::with_config(|c| c.capacity.denylist_v4 = 20_000);
    let many = hosts(50_000, [10, 2]);
    let imported = h.kernel.tables.import(RuleList::Deny, &many, &rule(None));
    assert_eq!(imported.created, 20_000);
    assert!(matches!(
        imported.stopped,
        Some(KernelError::Full {
            capacity: 20_000,
            ..
        })
    ));
    assert_eq!(h.kernel.tables.count(RuleList::Deny), 20_000);
    let mut listed: Vec<IpNet> = h
        .kernel
        .tables
        .entries(RuleList::Deny)
        .unwrap()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    listed.sort_unstable();
    let mut first = many[..20_000].to_vec();
    first.sort_unstable();
    assert_eq!(listed, first);
    let src = |ip: IpNet| match ip.addr() {
        std::net::IpAddr::V4(a) => Packet::ipv4(a.octets(), [198, 51, 100, 1])
            .tcp(1, 80)
            .build(),
        std::net::IpAddr::V6(_) => unreachable!(),
    };
    assert_eq!(h.run(&src(many[19_999])).0, XDP_DROP);
    assert_eq!(h.run(&src(many[20_000])).0, XDP_PASS);
    assert_eq!(h.run(&src(many[49_999])).0, XDP_PASS);
}

#[test]
fn reaper_removes_only_what_expired() {
    require_root!();
    let mut h = Harness::new();
    h.add(
        RuleList::Deny,
        "192.0.2.1/32",
        Some(Duration::from_millis(100)),
    )
    .unwrap();
    h.add(
        RuleList::Deny,
        "192.0.2.2/32",
        Some(Duration::from_secs(3600)),
    )
    .unwrap();
    h.add(RuleList::Deny, "192.0.2.3/32", None).unwrap();
    h.add(
        RuleList::Allow,
        "2001:db8::1/128",
        Some(Duration::from_millis(100)),
    )
    .unwrap();
    // Re-added with a longer TTL before expiry: must survive the reap.
    h.add(
        RuleList::Deny,
        "192.0.2.4/32",
        Some(Duration::from_millis(100)),
    )
    .unwrap();
    h.add(
        RuleList::Deny,
        "192.0.2.4/32",
        Some(Duration::from_secs(3600)),
    )
    .unwrap();
    sleep(Duration::from_millis(200));
    let reaped = h.kernel.tables.reap(clock::now_ns()).unwrap();
    let mut reaped: Vec<String> = reaped.iter().map(|(l, p)| format!("{l} {p}")).collect();
    reaped.sort();
    assert_eq!(
        reaped,
        ["allowlist 2001:db8::1/128", "denylist 192.0.2.1/32"]
    );
    assert_eq!(h.kernel.tables.count(RuleList::Deny), 3);
    assert_eq!(h.kernel.tables.count(RuleList::Allow), 0);
    assert!(h.kernel.tables.reap(clock::now_ns()).unwrap().is_empty());
}

#[test]
fn entries_survive_reloading_the_program() {
    require_root!();
    let pin_path = unique_pin_path("persist");
    let cfg = KernelConfig {
        pin_path: pin_path.clone(),
        ..KernelConfig::default()
    };
    let guard = scopeguard(&pin_path);
    let expires;
    {
        let mut kernel = Kernel::open(&cfg).unwrap();
        let p: IpNet = "203.0.113.0/24".parse().unwrap();
        kernel
            .tables
            .upsert(RuleList::Deny, &p, &rule(Some(Duration::from_secs(600))))
            .unwrap();
        expires = kernel
            .tables
            .get(RuleList::Deny, &p)
            .unwrap()
            .unwrap()
            .expires_at_ns;
        let (action, _) = kernel
            .test_run(
                &Packet::ipv4([203, 0, 113, 9], [198, 51, 100, 1])
                    .udp(1, 2)
                    .build(),
                1,
            )
            .unwrap();
        assert_eq!(action, XDP_DROP);
    }
    let kernel = Kernel::open(&cfg).unwrap();
    let p: IpNet = "203.0.113.0/24".parse().unwrap();
    let value = kernel
        .tables
        .get(RuleList::Deny, &p)
        .unwrap()
        .expect("entry kept");
    assert_eq!(value.expires_at_ns, expires, "expiry kept, not reset");
    assert_eq!(value.hits, 1, "hit count kept");
    assert_eq!(kernel.tables.count(RuleList::Deny), 1);
    let (action, _) = kernel
        .test_run(
            &Packet::ipv4([203, 0, 113, 9], [198, 51, 100, 1])
                .udp(1, 2)
                .build(),
            1,
        )
        .unwrap();
    assert_eq!(action, XDP_DROP);
    let (action, _) = kernel
        .test_run(
            &Packet::ipv4([203, 0, 114, 9], [198, 51, 100, 1])
                .udp(1, 2)
                .build(),
            1,
        )
        .unwrap();
    assert_eq!(action, XDP_PASS);
    drop(kernel);
    drop(guard);
}

/// Removes a pin directory when dropped, even if the test panicked.
struct PinGuard(std::path::PathBuf);
impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn scopeguard(path: &std::path::Path) -> PinGuard {
    PinGuard(path.to_owned())
}

/// Creates a map with the given shape and pins it at `path`.
fn pin_map(path: &std::path::Path, map_type: u32, key: u32, value: u32, entries: u32, flags: u32) {
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct PinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    let mut create = CreateAttr {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_flags: flags,
    };
    // SAFETY: the create prefix of `bpf_attr`, no pointers.
    let fd = unsafe { sys::bpf(BPF_MAP_CREATE, &mut create) }.expect("map create");
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut pin = PinAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: the pin prefix of `bpf_attr`; the path outlives the call.
    unsafe { sys::bpf(BPF_OBJ_PIN, &mut pin) }.expect("pin");
    // SAFETY: closing the fd we own.
    unsafe { libc::close(fd as i32) };
}

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Creates and pins an LPM trie with 8-byte values where DENY_V4_RULES belongs.
fn pin_foreign_map(path: &std::path::Path) {
    pin_map(path, BPF_MAP_TYPE_LPM_TRIE, 8, 8, 16, BPF_F_NO_PREALLOC);
}

fn open_at(pin_path: &std::path::Path) -> Result<Kernel, KernelError> {
    Kernel::open(&KernelConfig {
        pin_path: pin_path.to_owned(),
        ..KernelConfig::default()
    })
}

fn verdict(kernel: &Kernel, frame: &[u8]) -> u32 {
    kernel.test_run(frame, 1).expect("test run").0
}

fn v4_frame(src: [u8; 4]) -> Vec<u8> {
    Packet::ipv4(src, [198, 51, 100, 1]).udp(1, 2).build()
}

fn v6_frame(src: &str) -> Vec<u8> {
    let src: std::net::Ipv6Addr = src.parse().unwrap();
    Packet::ipv6(
        src,
        "2001:db8:ffff::1".parse::<std::net::Ipv6Addr>().unwrap(),
    )
    .udp(1, 2)
    .build()
}

/// Every kind of prefix keeps its entry, hits and structure across a
/// reload: short and long IPv4 rules (direct table, long map, parents),
/// IPv6 prefixes of several classes and under /32 (filter, metadata), and
/// IPv6 hosts (the filter's host bit is rebuilt from the host map).
#[test]
fn prefix_indexes_survive_reloading_the_program() {
    require_root!();
    let pin_path = unique_pin_path("persist-prefixes");
    let _guard = scopeguard(&pin_path);
    let prefixes = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.128/25",
        "10.1.2.128/30",
        "2001:d00::/24",
        "2001:db8::/32",
        "2001:db8:1::/48",
        "2001:db8:1:2::/64",
        "2001:db8:1:2::/125",
        "2001:db8:9::9/128",
    ];
    let hits_before: Vec<u64>;
    {
        let mut kernel = open_at(&pin_path).unwrap();
        for p in prefixes {
            let p: IpNet = p.parse().unwrap();
            kernel
                .tables
                .upsert(RuleList::Deny, &p, &rule(None))
                .unwrap();
        }
        kernel
            .tables
            .upsert(
                RuleList::Deny,
                &"10.1.2.0/28".parse().unwrap(),
                &rule(Some(Duration::from_secs(600))),
            )
            .unwrap();
        for src in [
            [10, 1, 2, 129],
            [10, 1, 2, 200],
            [10, 1, 3, 1],
            [10, 9, 9, 9],
        ] {
            assert_eq!(verdict(&kernel, &v4_frame(src)), XDP_DROP, "{src:?}");
        }
        for src in [
            "2001:db8:1:2::3",
            "2001:db8:1:3::1",
            "2001:db8:2::1",
            "2001:dff::1",
            "2001:db8:9::9",
        ] {
            assert_eq!(verdict(&kernel, &v6_frame(src)), XDP_DROP, "{src}");
        }
        hits_before = prefixes
            .iter()
            .map(|p| {
                kernel
                    .tables
                    .get(RuleList::Deny, &p.parse().unwrap())
                    .unwrap()
                    .unwrap()
                    .hits
            })
            .collect();
        assert_eq!(hits_before, [1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1]);
    }
    let kernel = open_at(&pin_path).unwrap();
    assert_eq!(kernel.tables.count(RuleList::Deny), prefixes.len() + 1);
    let hits_after: Vec<u64> = prefixes
        .iter()
        .map(|p| {
            kernel
                .tables
                .get(RuleList::Deny, &p.parse().unwrap())
                .unwrap()
                .unwrap()
                .hits
        })
        .collect();
    assert_eq!(hits_after, hits_before, "hit counts kept");
    let timed = kernel
        .tables
        .get(RuleList::Deny, &"10.1.2.0/28".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_ne!(timed.expires_at_ns, 0, "expiry kept");
    for src in [[10, 1, 2, 129], [10, 1, 2, 5], [10, 200, 0, 1]] {
        assert_eq!(
            verdict(&kernel, &v4_frame(src)),
            XDP_DROP,
            "{src:?} after reload"
        );
    }
    assert_eq!(verdict(&kernel, &v4_frame([11, 0, 0, 1])), XDP_PASS);
    for src in ["2001:db8:1:2::3", "2001:dff::1", "2001:db8:9::9"] {
        assert_eq!(
            verdict(&kernel, &v6_frame(src)),
            XDP_DROP,
            "{src} after reload"
        );
    }
    assert_eq!(verdict(&kernel, &v6_frame("2001:e00::1")), XDP_PASS);
    let host = kernel
        .tables
        .get(RuleList::Deny, &"2001:db8:9::9/128".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(host.hits, 2, "the host was found through the rebuilt gate");
}

/// A crash can stop the daemon between writing a rule and pointing the
/// table at it; the next start rebuilds the table from the rules.
#[test]
fn a_damaged_direct_table_is_repaired_at_start() {
    require_root!();
    let pin_path = unique_pin_path("repair");
    let _guard = scopeguard(&pin_path);
    {
        let mut kernel = open_at(&pin_path).unwrap();
        kernel
            .tables
            .upsert(
                RuleList::Deny,
                &"203.0.113.0/24".parse().unwrap(),
                &rule(None),
            )
            .unwrap();
        assert_eq!(verdict(&kernel, &v4_frame([203, 0, 113, 9])), XDP_DROP);
    }
    // Zero the element of the table that holds 203.0.113.0/24's slot, as
    // a crash before the slot was written would leave it.
    let map = aya::maps::MapData::from_pin(pin_path.join("DENY_V4_DIRECT")).unwrap();
    let mut table: aya::maps::Array<_, [u32; 256]> =
        aya::maps::Array::try_from(aya::maps::Map::Array(map)).unwrap();
    let element = u32::from_be_bytes([203, 0, 113, 0]) >> 16;
    let mut slots = table.get(&element, 0).unwrap();
    assert_ne!(slots[113], 0, "the slot was written");
    slots[113] = 0;
    table.set(element, slots, 0).unwrap();
    drop(table);
    let kernel = open_at(&pin_path).unwrap();
    assert_eq!(verdict(&kernel, &v4_frame([203, 0, 113, 9])), XDP_DROP);
}

#[test]
fn refuses_a_direct_table_of_another_size() {
    require_root!();
    let pin_path = unique_pin_path("foreign-size");
    let _guard = scopeguard(&pin_path);
    drop(open_at(&pin_path).unwrap());
    std::fs::remove_file(pin_path.join("DENY_V4_DIRECT")).unwrap();
    pin_map(
        &pin_path.join("DENY_V4_DIRECT"),
        BPF_MAP_TYPE_ARRAY,
        4,
        1024,
        300,
        BPF_F_MMAPABLE,
    );
    let text = open_at(&pin_path).err().expect("refused").to_string();
    assert!(text.contains("DENY_V4_DIRECT has 300 elements"), "{text}");
    // And one that cannot be mapped into memory.
    std::fs::remove_file(pin_path.join("DENY_V4_DIRECT")).unwrap();
    pin_map(
        &pin_path.join("DENY_V4_DIRECT"),
        BPF_MAP_TYPE_ARRAY,
        4,
        1024,
        65_536,
        0,
    );
    let text = open_at(&pin_path).err().expect("refused").to_string();
    assert!(text.contains("without BPF_F_MMAPABLE"), "{text}");
}

#[test]
fn full_ipv6_prefix_index_is_an_error() {
    require_root!();
    let mut h = Harness::with_config(|c| c.capacity.denylist_v6 = 10);
    let many: Vec<IpNet> = (0..15u16)
        .map(|i| format!("2001:db8:{i:x}::/48").parse().unwrap())
        .collect();
    let imported = h.kernel.tables.import(RuleList::Deny, &many, &rule(None));
    assert_eq!(imported.created, 10);
    assert!(matches!(
        imported.stopped,
        Some(KernelError::Full { capacity: 10, .. })
    ));
    assert_eq!(h.kernel.tables.count(RuleList::Deny), 10);
    let err = h.add(RuleList::Deny, "2001:db8:ff::/48", None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the denylist is full (10 entries): remove entries or raise kernel.capacity.denylist-v6"
    );
    // What was written is in force; what was not is not.
    assert_eq!(h.run(&v6_frame("2001:db8:9::1")).0, XDP_DROP);
    assert_eq!(h.run(&v6_frame("2001:db8:a::1")).0, XDP_PASS);
}

#[test]
fn refuses_pinned_maps_of_another_layout() {
    require_root!();
    let pin_path = unique_pin_path("foreign");
    let _guard = scopeguard(&pin_path);
    // Let a first start create the directory on bpffs, then replace one map.
    drop(
        Kernel::open(&KernelConfig {
            pin_path: pin_path.clone(),
            ..KernelConfig::default()
        })
        .unwrap(),
    );
    std::fs::remove_file(pin_path.join("DENY_V4_RULES")).unwrap();
    pin_foreign_map(&pin_path.join("DENY_V4_RULES"));
    let err = Kernel::open(&KernelConfig {
        pin_path: pin_path.clone(),
        ..KernelConfig::default()
    })
    .err()
    .expect("a foreign layout must be refused");
    let text = err.to_string();
    assert!(text.contains("incompatible Sentinel version"), "{text}");
    assert!(text.contains("DENY_V4_RULES"), "{text}");
    assert!(text.contains("8-byte values"), "{text}");
}

/// The bulk path of the prefix indexes: thousands of IPv4 prefixes of
/// mixed lengths (direct table and long map) and IPv6 prefixes in one
/// import, in force for every address checked; a second import replaces
/// them in bulk and keeps their hits.
#[test]
fn bulk_import_of_prefixes_is_in_force() {
    require_root!();
    let mut h = Harness::new();
    let mut v4: Vec<IpNet> = (0..3000u32)
        .map(|i| {
            let len = [16u8, 20, 24, 24, 26, 28][(i % 6) as usize];
            let a = std::net::Ipv4Addr::from(i.wrapping_mul(2_654_435_761));
            IpNet::V4(ipnet::Ipv4Net::new(a, len).unwrap().trunc())
        })
        .collect();
    v4.sort();
    v4.dedup();
    // Nested ones would make "inside this prefix" ambiguous below.
    let v4: Vec<IpNet> = v4
        .iter()
        .filter(|p| !v4.iter().any(|q| q != *p && q.contains(*p)))
        .copied()
        .collect();
    let v6: Vec<IpNet> = (0..1000u32)
        .map(|i| {
            let len = [32u8, 48, 56, 64][(i % 4) as usize];
            let a = std::net::Ipv6Addr::from(
                (0x2001_0db8u128 << 96) | (u128::from(i.wrapping_mul(2_654_435_761)) << 64),
            );
            IpNet::V6(ipnet::Ipv6Net::new(a, len).unwrap().trunc())
        })
        .collect();
    let mut all = v4.clone();
    all.extend(&v6);
    all.sort();
    all.dedup();
    let imported = h.kernel.tables.import(RuleList::Deny, &all, &rule(None));
    assert!(imported.stopped.is_none(), "{:?}", imported.stopped);
    assert_eq!(imported.created, all.len());
    assert_eq!(h.kernel.tables.count(RuleList::Deny), all.len());
    for p in v4.iter().step_by(7) {
        let IpNet::V4(net) = p else { unreachable!() };
        let last = net.broadcast().octets();
        assert_eq!(h.run(&v4_frame(last)).0, XDP_DROP, "{p}");
    }
    assert_eq!(h.run(&v4_frame([203, 0, 113, 1])).0, XDP_PASS);
    for p in v6.iter().step_by(37) {
        let IpNet::V6(net) = p else { unreachable!() };
        let inside = std::net::Ipv6Addr::from(u128::from(net.network()) | 1);
        assert_eq!(h.run(&v6_frame(&inside.to_string())).0, XDP_DROP, "{p}");
    }
    assert_eq!(h.run(&v6_frame("2001:db9::1")).0, XDP_PASS);
    let first_v4 = v4[0];
    let IpNet::V4(net) = first_v4 else {
        unreachable!()
    };
    assert_eq!(h.run(&v4_frame(net.network().octets())).0, XDP_DROP);
    // Re-importing replaces in bulk and keeps the hit.
    let again = h
        .kernel
        .tables
        .import(RuleList::Deny, &all, &rule(Some(Duration::from_secs(60))));
    assert!(again.stopped.is_none(), "{:?}", again.stopped);
    assert_eq!((again.created, again.replaced), (0, all.len()));
    let value = h
        .kernel
        .tables
        .get(RuleList::Deny, &first_v4)
        .unwrap()
        .expect("present");
    assert!(value.hits >= 1, "hits kept across the bulk replacement");
    assert_ne!(value.expires_at_ns, 0, "and the new TTL taken");
}
