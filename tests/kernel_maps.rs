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

/// Creates and pins an LPM trie with 8-byte values where DENY_V4_RULES belongs.
fn pin_foreign_map(path: &std::path::Path) {
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
    const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let mut create = CreateAttr {
        map_type: BPF_MAP_TYPE_LPM_TRIE,
        key_size: 8,
        value_size: 8,
        max_entries: 16,
        map_flags: BPF_F_NO_PREALLOC,
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
