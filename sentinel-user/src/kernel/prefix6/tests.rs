//! The IPv6 index against a brute-force model: random adds, removals,
//! expiries and hosts, then the program's search at and around every
//! entry, the filter bit by bit, and the rebuild at start.

use std::net::Ipv6Addr;

use ipnet::IpNet;
use sentinel_common::{
    Meta, RuleValue,
    prefix::{PrefixKey6, filter},
};

use super::{Prefix6Index, key_of, mask, top};
use crate::kernel::{
    region::Region,
    rule_maps::RuleMap,
    table::{MemTable, Table},
};

/// What the tests need to see inside.
impl<P: Table<PrefixKey6, RuleValue>> Prefix6Index<P> {
    /// The program's search, step for step (`v6_list_match` and
    /// `v6_prefix_match` in sentinel-ebpf) with the metadata `describe`
    /// writes: whether the host map would be looked up, and the length of
    /// the prefix that would take the hit.
    pub fn lookup(&self, addr: u128, now: u64) -> (bool, Option<u8>) {
        let mut meta = Meta::default();
        self.describe(&mut meta, 0);
        let meta = meta.v6[0];
        let slot = self
            .filter
            .load(filter::slot_of(top(addr), meta.filter_bits) as usize);
        let wide = |m: [u64; 2]| u128::from(m[0]) | (u128::from(m[1]) << 64);
        let mut candidates = (wide(filter::lengths_of(slot & !filter::HOST)) & wide(meta.lengths))
            | wide(meta.always);
        while candidates != 0 {
            let len = 127 - candidates.leading_zeros();
            candidates &= !(1 << len);
            let len = len as u8;
            if let Ok(Some(value)) = self.prefixes.get(&key_of(addr & mask(len), len))
                && (value.expires_at_ns == 0 || now < value.expires_at_ns)
            {
                return (slot & filter::HOST != 0, Some(len));
            }
        }
        (slot & filter::HOST != 0, None)
    }

    pub fn filter(&self) -> &Region<u32> {
        &self.filter
    }

    pub fn prefix_map(&mut self) -> &mut P {
        &mut self.prefixes
    }

    pub fn into_parts(self) -> (Region<u32>, P) {
        (self.filter, self.prefixes)
    }
}

type Index = Prefix6Index<MemTable<PrefixKey6, RuleValue>>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn wide(&mut self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }
}

const BITS: u32 = filter::MIN_BITS;

fn index(capacity: u32) -> Index {
    let mut ix =
        Prefix6Index::open(Region::heap(1 << BITS), MemTable::new(capacity)).expect("open");
    ix.restore_hosts(&[]).expect("restore");
    ix
}

fn value(expires_at_ns: u64) -> RuleValue {
    RuleValue {
        expires_at_ns,
        ..RuleValue::zeroed()
    }
}

fn net(text: &str) -> (u128, u8) {
    let net: ipnet::Ipv6Net = text.parse().expect("prefix");
    (u128::from(net.network()), net.prefix_len())
}

fn host(addr: u128) -> IpNet {
    IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(addr), 128).expect("host"))
}

#[derive(Default)]
struct Model {
    prefixes: Vec<(u128, u8, u64)>,
    hosts: Vec<u128>,
}

impl Model {
    fn lookup(&self, addr: u128, now: u64) -> Option<u8> {
        self.prefixes
            .iter()
            .filter(|(n, l, e)| addr & mask(*l) == *n && (*e == 0 || now < *e))
            .map(|r| r.1)
            .max()
    }

    fn add(&mut self, network: u128, len: u8, expires: u64) {
        match self
            .prefixes
            .iter_mut()
            .find(|r| r.0 == network && r.1 == len)
        {
            Some(r) => r.2 = expires,
            None => self.prefixes.push((network, len, expires)),
        }
    }
}

/// A prefix in one of a few /32s, so that slots hold several; lengths
/// from /0 to /127, with lengths that share a class (48, 79 and 110; 32,
/// 63, 94 and 125) well represented.
fn random_prefix(rng: &mut Rng) -> (u128, u8) {
    let tops: [u128; 3] = [0x2001_0db8, 0x2001_0db9, 0x2a00_1450];
    let base = tops[rng.below(3) as usize] << 96;
    let len = match rng.below(12) {
        0 => rng.below(32) as u8,
        1 => [32, 63, 94, 125][rng.below(4) as usize],
        2..=4 => [48, 79, 110][rng.below(3) as usize],
        5..=6 => 56 + rng.below(9) as u8,
        7 => 122 + rng.below(6) as u8,
        _ => 33 + rng.below(95) as u8,
    };
    let noise = rng.wide() & !(u128::MAX << 96);
    let a = base | noise;
    (a & mask(len), len)
}

fn check(ix: &Index, model: &Model, rng: &mut Rng, now: u64) {
    assert_eq!(ix.len(), model.prefixes.len());
    let mut addresses: Vec<u128> = Vec::new();
    for &(n, l, _) in &model.prefixes {
        let last = n | !mask(l);
        addresses.extend([n, last, n.wrapping_sub(1), last.wrapping_add(1)]);
    }
    addresses.extend(model.hosts.iter().copied());
    addresses.extend((0..64).map(|_| (0x2001_0db8u128 << 96) | (rng.wide() >> 32)));
    for &a in &addresses {
        let (gate, found) = ix.lookup(a, now);
        assert_eq!(
            found,
            model.lookup(a, now),
            "search of {}",
            Ipv6Addr::from(a)
        );
        if model.hosts.contains(&a) {
            assert!(gate, "host {} not gated in", Ipv6Addr::from(a));
        }
        // The slot is exact: it names the lengths of the prefixes hashing
        // there, the one length itself when they all have one.
        let slot_no = filter::slot_of(top(a), BITS);
        let slot = ix.filter().load(slot_no as usize);
        let lengths: std::collections::BTreeSet<u32> = model
            .prefixes
            .iter()
            .filter(|&&(n, l, _)| {
                u32::from(l) >= filter::FIRST_LEN && filter::slot_of(top(n), BITS) == slot_no
            })
            .map(|&(_, l, _)| u32::from(l))
            .collect();
        let mut want = match lengths.len() {
            0 => 0,
            1 => filter::EXACT | lengths.first().copied().unwrap_or_default(),
            _ => lengths.iter().fold(0, |m, l| m | 1 << filter::class_of(*l)),
        };
        for &h in &model.hosts {
            if filter::slot_of(top(h), BITS) == slot_no {
                want |= filter::HOST;
            }
        }
        assert_eq!(slot, want, "slot of {}", Ipv6Addr::from(a));
    }
}

#[test]
fn random_operations_match_brute_force() {
    let mut rng = Rng(7);
    let mut ix = index(300);
    let mut model = Model::default();
    let now = 1_000;
    for round in 0..40 {
        for _ in 0..10 {
            match rng.below(6) {
                0 if !model.prefixes.is_empty() => {
                    let at = rng.below(model.prefixes.len() as u64) as usize;
                    let (n, l, _) = model.prefixes.swap_remove(at);
                    assert!(ix.delete(n, l).expect("delete"));
                }
                1 => {
                    let h = (0x2001_0db8u128 << 96) | (rng.wide() >> 32);
                    model.hosts.push(h);
                    ix.hosts_changed(&[host(h)], true).expect("hosts");
                }
                2 if !model.hosts.is_empty() => {
                    let at = rng.below(model.hosts.len() as u64) as usize;
                    let h = model.hosts.swap_remove(at);
                    ix.hosts_changed(&[host(h)], false).expect("hosts");
                }
                _ if model.prefixes.len() < 300 => {
                    let (n, l) = random_prefix(&mut rng);
                    let expires = if rng.below(4) == 0 { now - 1 } else { 0 };
                    let known = model.prefixes.iter().any(|r| r.0 == n && r.1 == l);
                    assert_eq!(ix.upsert(n, l, &value(expires)).expect("upsert"), !known);
                    model.add(n, l, expires);
                }
                _ => {}
            }
        }
        if round % 5 == 4 {
            let items: Vec<(u128, u8)> = (0..12).map(|_| random_prefix(&mut rng)).collect();
            let values = vec![value(0); items.len()];
            let (written, error) = ix.write_many(&items, &values);
            assert!(error.is_none() || written < items.len());
            for &(n, l) in &items[..written] {
                model.add(n, l, 0);
            }
        }
        check(&ix, &model, &mut rng, now);
        if round % 10 == 9 {
            // A restart: the prefixes from the map, the hosts from the
            // rule tables.
            let (filter, map) = ix.into_parts();
            ix = Prefix6Index::open(filter, map).expect("reopen");
            let hosts: Vec<IpNet> = model.hosts.iter().map(|h| host(*h)).collect();
            ix.restore_hosts(&hosts).expect("restore");
            check(&ix, &model, &mut rng, now);
        }
    }
}

#[test]
fn lengths_in_the_metadata_follow_the_entries() {
    let mut ix = index(16);
    let describe = |ix: &Index| {
        let mut meta = Meta::default();
        ix.describe(&mut meta, 1);
        meta.v6[1]
    };
    for text in [
        "2001:db8::/29",
        "2001:db8::/48",
        "2001:db8:1::/78",
        "2001:db8::/127",
    ] {
        let (n, l) = net(text);
        ix.upsert(n, l, &value(0)).expect("upsert");
    }
    let meta = describe(&ix);
    assert_eq!(meta.filter_bits, BITS);
    assert_eq!(meta.always, [1 << 29, 0], "/29 is probed for every address");
    assert_eq!(
        meta.lengths,
        [1 << 48, (1 << (78 - 64)) | (1 << (127 - 64))]
    );
    // /48 and /78 share class 16; /127 is class 5.
    let slot = filter::slot_of(0x2001_0db8, BITS) as usize;
    assert_eq!(ix.filter().load(slot), (1 << 16) | (1 << 5));
    let (n, l) = net("2001:db8::/48");
    ix.delete(n, l).expect("delete");
    assert_eq!(describe(&ix).lengths[0], 0);
    // A class bit stays while another prefix of that class is in the slot.
    assert_eq!(ix.filter().load(slot), (1 << 16) | (1 << 5));
    let (gate, found) = ix.lookup(net("2001:db8:1::1/128").0, 1);
    assert!(!gate);
    assert_eq!(found, Some(78));
    let (n, l) = net("2001:db8:1::/78");
    ix.delete(n, l).expect("delete");
    assert_eq!(
        ix.filter().load(slot),
        filter::EXACT | 127,
        "one length left: the slot names it alone"
    );
    // A host keeps the slot's lengths.
    let h = net("2001:db8:7::1/128").0;
    ix.hosts_changed(&[host(h)], true).expect("hosts");
    assert_eq!(ix.filter().load(slot), filter::HOST | filter::EXACT | 127);
    ix.hosts_changed(&[host(h)], false).expect("hosts");
    assert_eq!(ix.filter().load(slot), filter::EXACT | 127);
    // Below /32: found through `always`, whatever the slot.
    let (_, found) = ix.lookup(net("2001:dbf:ffff::1/128").0, 1);
    assert_eq!(found, Some(29));
}

#[test]
fn expired_longer_prefix_falls_back_through_classes() {
    let mut ix = index(16);
    for (text, expires) in [
        ("2001:db8::/32", 0),
        ("2001:db8:1::/48", 5),
        ("2001:db8:1:2::/64", 5),
        ("2001:db8:1:2::/127", 5),
    ] {
        let (n, l) = net(text);
        ix.upsert(n, l, &value(expires)).expect("upsert");
    }
    let a = net("2001:db8:1:2::1/128").0;
    assert_eq!(ix.lookup(a, 1).1, Some(127));
    assert_eq!(ix.lookup(a, 10).1, Some(32), "past three expired layers");
}

#[test]
fn batch_counts_only_what_was_written() {
    let mut ix = index(2);
    let items = [
        net("2001:db8::/48"),
        net("2001:db8:1::/48"),
        net("2001:db8:2::/48"),
    ];
    let (written, error) = ix.write_many(&items, &[value(0); 3]);
    assert_eq!(written, 2);
    assert_eq!(error.map(|e| e.raw_os_error()), Some(Some(libc::E2BIG)));
    assert_eq!(ix.len(), 2);
    assert_eq!(ix.lookup(net("2001:db8:2::1/128").0, 1).1, None);
    // Replacing an entry in a full map still works and changes no count.
    let (written, error) = ix.write_many(&items[..1], &[value(9)]);
    assert_eq!((written, error.is_none()), (1, true));
    assert_eq!(ix.len(), 2);
}

#[test]
fn restart_rebuilds_a_stale_filter() {
    let mut ix = index(16);
    let (n, l) = net("2001:db8:5::/48");
    ix.upsert(n, l, &value(0)).expect("upsert");
    let h = net("2001:db8:6::1/128").0;
    ix.hosts_changed(&[host(h)], true).expect("hosts");
    let slot = filter::slot_of(0x2001_0db8, BITS) as usize;
    // A crash left the length unset and a junk bit elsewhere; an entry
    // that cannot be a prefix sits in the map.
    ix.filter().store(slot, filter::HOST);
    ix.filter().store((slot + 1) % (1 << BITS), 1 << 3);
    // A key without a marker bit names no prefix.
    let junk = PrefixKey6 { marked: [0; 4] };
    ix.prefix_map().insert(&junk, &value(0)).expect("insert");
    let (filter_region, map) = ix.into_parts();
    let mut ix = Prefix6Index::open(filter_region, map).expect("reopen");
    ix.restore_hosts(&[host(h)]).expect("restore");
    assert_eq!(ix.filter().load(slot), filter::HOST | filter::EXACT | 48);
    assert_eq!(ix.filter().load((slot + 1) % (1 << BITS)), 0);
    assert_eq!(ix.len(), 1, "the entry that is no prefix was dropped");
    assert!(ix.prefix_map().get(&junk).expect("get").is_none());
    assert_eq!(ix.lookup(net("2001:db8:5::9/128").0, 1), (true, Some(48)));
}
