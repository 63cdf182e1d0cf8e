//! The IPv4 index against a brute-force model: random adds, removals and
//! expiries, in single and batched writes, then every invariant and the
//! program's lookup on addresses at and around every rule's edges; and the
//! repair at start from tables a crash could leave.

use std::net::Ipv4Addr;

use sentinel_common::{
    RuleValue,
    prefix::{LongKey4, PrefixRule4, direct},
};

use super::{MAX_CHAIN, Prefix4Index, key};
use crate::kernel::{region::Region, table::MemTable, table::Table};

/// What the tests need to see inside.
impl<L: Table<LongKey4, u32>> Prefix4Index<L> {
    /// The program's lookup, step for step (`v4_prefix_match` in
    /// sentinel-ebpf): the rule index that would take the hit, if any.
    pub fn lookup(&self, addr: u32, now: u64) -> Option<u32> {
        let slot = self.direct.load(direct::slot_of(addr, self.bits) as usize);
        let mut rule = direct::rule(slot, self.bits);
        let mut longer = direct::longer(slot, self.bits);
        while longer != 0 {
            let j = 31 - longer.leading_zeros();
            longer &= !(1 << j);
            let len = self.bits + 1 + j;
            let key = LongKey4 {
                prefix_len: len,
                network: addr & direct::mask(len),
            };
            if let Ok(Some(found)) = self.long.get(&key)
                && self.covers(found, addr)
            {
                rule = found;
                break;
            }
        }
        for _ in 0..MAX_CHAIN {
            if rule == 0 || !self.covers(rule, addr) {
                return None;
            }
            let element = self.rules.read(rule as usize);
            let expires = element.value.expires_at_ns;
            if expires == 0 || now < expires {
                return Some(rule);
            }
            rule = element.parent;
        }
        None
    }

    fn covers(&self, index: u32, addr: u32) -> bool {
        if index as usize >= self.rules.len() {
            return false;
        }
        let element = self.rules.read(index as usize);
        let len = element.value.prefix_len;
        element.in_use != 0 && len <= 32 && addr & direct::mask(len) == element.network
    }

    /// The rule (network, length) at an index.
    pub fn rule_at(&self, index: u32) -> (u32, u8) {
        let element = self.rules.read(index as usize);
        (element.network, element.value.prefix_len as u8)
    }

    /// The parent recorded in the shared element of a rule.
    pub fn parent_of(&self, network: u32, len: u8) -> Option<u32> {
        let index = *self.by_key.get(&key(network, len))?;
        Some(self.rules.read(index as usize).parent)
    }

    pub fn index_of(&self, network: u32, len: u8) -> Option<u32> {
        self.by_key.get(&key(network, len)).copied()
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn direct(&self) -> &Region<u32> {
        &self.direct
    }

    pub fn shared_rules(&self) -> &Region<PrefixRule4> {
        &self.rules
    }

    pub fn long_map(&mut self) -> &mut L {
        &mut self.long
    }

    pub fn into_parts(self) -> (Region<u32>, Region<PrefixRule4>, L) {
        (self.direct, self.rules, self.long)
    }
}

type Index = Prefix4Index<MemTable<LongKey4, u32>>;

/// SplitMix64: deterministic, so that a failure reproduces.
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
}

fn index(bits: u32, capacity: usize) -> Index {
    Prefix4Index::open(
        Region::heap(1 << bits),
        Region::heap(capacity + 1),
        MemTable::new(capacity as u32),
    )
    .expect("open")
}

fn reopen(ix: Index) -> Index {
    let (direct, rules, long) = ix.into_parts();
    Prefix4Index::open(direct, rules, long).expect("reopen")
}

fn value(expires_at_ns: u64) -> RuleValue {
    RuleValue {
        expires_at_ns,
        ..RuleValue::zeroed()
    }
}

fn net(text: &str) -> (u32, u8) {
    let (addr, len) = text.split_once('/').expect("a/len");
    let addr: Ipv4Addr = addr.parse().expect("address");
    let len: u8 = len.parse().expect("length");
    (u32::from(addr) & direct::mask(len.into()), len)
}

fn addr(text: &str) -> u32 {
    u32::from(text.parse::<Ipv4Addr>().expect("address"))
}

/// The rules as the model knows them: (network, length, expiry).
#[derive(Default)]
struct Model {
    rules: Vec<(u32, u8, u64)>,
}

impl Model {
    fn covers(network: u32, len: u8, addr: u32) -> bool {
        addr & direct::mask(len.into()) == network
    }

    fn add(&mut self, network: u32, len: u8, expires: u64) {
        match self.rules.iter_mut().find(|r| r.0 == network && r.1 == len) {
            Some(rule) => rule.2 = expires,
            None => self.rules.push((network, len, expires)),
        }
    }

    fn remove(&mut self, network: u32, len: u8) {
        self.rules.retain(|r| !(r.0 == network && r.1 == len));
    }

    /// The longest live rule covering `addr`.
    fn lookup(&self, addr: u32, now: u64) -> Option<(u32, u8)> {
        self.rules
            .iter()
            .filter(|(n, l, e)| Self::covers(*n, *l, addr) && (*e == 0 || now < *e))
            .max_by_key(|r| r.1)
            .map(|r| (r.0, r.1))
    }

    /// The longest rule strictly covering `(network, len)`.
    fn parent(&self, network: u32, len: u8) -> Option<(u32, u8)> {
        self.rules
            .iter()
            .filter(|(n, l, _)| *l < len && Self::covers(*n, *l, network))
            .max_by_key(|r| r.1)
            .map(|r| (r.0, r.1))
    }
}

/// Addresses worth asking about: each rule's first and last address and
/// their neighbours, and a few random ones.
fn probes(model: &Model, rng: &mut Rng) -> Vec<u32> {
    let mut out = Vec::new();
    for &(network, len, _) in &model.rules {
        let last = network | !direct::mask(len.into());
        out.extend([network, last, network.wrapping_sub(1), last.wrapping_add(1)]);
    }
    out.extend((0..64).map(|_| rng.next() as u32));
    out
}

/// Every invariant of the index against the model, and the lookups.
fn check(ix: &mut Index, model: &Model, rng: &mut Rng, now: u64) {
    let bits = ix.bits();
    assert_eq!(ix.len(), model.rules.len(), "rule count");
    // Parents, in the shared elements.
    for &(network, len, _) in &model.rules {
        let parent = ix.parent_of(network, len).expect("rule present");
        let want = model
            .parent(network, len)
            .map(|(n, l)| ix.index_of(n, l).expect("parent present"))
            .unwrap_or(0);
        assert_eq!(parent, want, "parent of {}/{len}", Ipv4Addr::from(network));
    }
    // The long map: exactly the rules longer than the table's bits.
    let mut long: Vec<(u32, u32, u32)> = ix
        .long_map()
        .entries()
        .expect("entries")
        .into_iter()
        .map(|(k, i)| (k.prefix_len, k.network, i))
        .collect();
    long.sort_unstable();
    let mut want: Vec<(u32, u32, u32)> = model
        .rules
        .iter()
        .filter(|r| u32::from(r.1) > bits)
        .map(|r| (u32::from(r.1), r.0, ix.index_of(r.0, r.1).expect("present")))
        .collect();
    want.sort_unstable();
    assert_eq!(long, want, "long map");
    // Slots, at every probe address.
    let addresses = probes(model, rng);
    for &a in &addresses {
        let slot = ix.direct().load(direct::slot_of(a, bits) as usize);
        let block = direct::slot_of(a, bits) << (32 - bits);
        let best = model
            .rules
            .iter()
            .filter(|r| u32::from(r.1) <= bits && Model::covers(r.0, r.1, block))
            .max_by_key(|r| r.1)
            .map(|r| ix.index_of(r.0, r.1).expect("present"))
            .unwrap_or(0);
        assert_eq!(
            direct::rule(slot, bits),
            best,
            "slot rule of {}",
            Ipv4Addr::from(a)
        );
        let mut longer = 0;
        for r in &model.rules {
            if u32::from(r.1) > bits && direct::slot_of(r.0, bits) == direct::slot_of(a, bits) {
                longer |= 1 << (u32::from(r.1) - bits - 1);
            }
        }
        assert_eq!(
            direct::longer(slot, bits),
            longer,
            "longer bits of {}",
            Ipv4Addr::from(a)
        );
        // And the program's answer.
        let got = ix.lookup(a, now).map(|i| ix.rule_at(i));
        assert_eq!(got, model.lookup(a, now), "lookup of {}", Ipv4Addr::from(a));
    }
}

/// A random prefix in one of a few regions, so that rules nest and
/// overlap; lengths are spread over 0-31, mostly long.
fn random_prefix(rng: &mut Rng) -> (u32, u8) {
    let regions = [0x0a00_0000u32, 0xc000_0200, 0xc633_6400, 0xcb00_7100];
    let base = regions[rng.below(regions.len() as u64) as usize];
    let len = match rng.below(10) {
        0 => rng.below(9) as u8,
        1..=3 => 9 + rng.below(12) as u8,
        _ => 21 + rng.below(11) as u8,
    };
    let noise = (rng.next() as u32) & 0x00ff_ffff;
    let a = base ^ noise;
    (a & direct::mask(len.into()), len)
}

fn random_operations(bits: u32, seed: u64, rounds: usize) {
    let mut rng = Rng(seed);
    let mut ix = index(bits, 400);
    let mut model = Model::default();
    let now = 1_000;
    for round in 0..rounds {
        for _ in 0..12 {
            let (network, len) = random_prefix(&mut rng);
            match rng.below(4) {
                0 if !model.rules.is_empty() => {
                    let victim = model.rules[rng.below(model.rules.len() as u64) as usize];
                    assert!(ix.delete(victim.0, victim.1).expect("delete"));
                    model.remove(victim.0, victim.1);
                }
                _ if model.rules.len() < 400 => {
                    // A quarter expired: lookups must look past them.
                    let expires = if rng.below(4) == 0 { now - 1 } else { 0 };
                    let created = ix.upsert(network, len, &value(expires)).expect("upsert");
                    let known = model.rules.iter().any(|r| r.0 == network && r.1 == len);
                    assert_eq!(created, !known);
                    model.add(network, len, expires);
                }
                _ => {}
            }
        }
        // Every fourth round, a batch too.
        if round % 4 == 3 {
            let items: Vec<(u32, u8)> = (0..20).map(|_| random_prefix(&mut rng)).collect();
            let room = 400 - model.rules.len();
            let values: Vec<RuleValue> = items.iter().map(|_| value(0)).collect();
            let (written, error) = ix.write_many(&items, &values);
            let mut fresh = std::collections::HashSet::new();
            let mut expect = 0;
            for item in &items {
                let known = model.rules.iter().any(|r| (r.0, r.1) == *item);
                if !known && !fresh.contains(item) {
                    if fresh.len() == room {
                        break;
                    }
                    fresh.insert(*item);
                }
                expect += 1;
            }
            assert_eq!(
                written, expect,
                "batch stops at the first rule without room"
            );
            assert_eq!(error.is_some(), written < items.len());
            for item in &items[..written] {
                model.add(item.0, item.1, 0);
            }
        }
        check(&mut ix, &model, &mut rng, now);
        if round % 8 == 7 {
            ix = reopen(ix);
            check(&mut ix, &model, &mut rng, now);
        }
    }
}

#[test]
fn random_operations_small_table() {
    random_operations(direct::SMALL_BITS, 1, 48);
}

#[test]
fn random_operations_other_seeds() {
    for seed in 2..6 {
        random_operations(direct::SMALL_BITS, seed, 16);
    }
}

#[test]
fn large_table_boundary_and_fallback() {
    let mut ix = index(direct::LARGE_BITS, 64);
    let now = 1_000;
    for (text, expires) in [
        ("192.0.0.0/16", 0),
        ("192.0.2.0/24", 0),
        ("192.0.2.0/28", now - 1),
        ("192.0.2.8/30", 0),
        ("192.0.2.8/31", now - 1),
    ] {
        let (n, l) = net(text);
        assert!(ix.upsert(n, l, &value(expires)).expect("upsert"));
    }
    let at = |ix: &Index, a: &str| ix.lookup(addr(a), now).map(|i| ix.rule_at(i));
    // /31 expired, /30 live: the /30.
    assert_eq!(at(&ix, "192.0.2.9"), Some(net("192.0.2.8/30")));
    // Inside the expired /28 but not the /30: past it to the /24.
    assert_eq!(at(&ix, "192.0.2.3"), Some(net("192.0.2.0/24")));
    assert_eq!(at(&ix, "192.0.2.200"), Some(net("192.0.2.0/24")));
    assert_eq!(at(&ix, "192.0.3.1"), Some(net("192.0.0.0/16")));
    assert_eq!(at(&ix, "192.1.0.1"), None);
    // Removing the /24 gives its blocks and children back to the /16.
    let (n, l) = net("192.0.2.0/24");
    assert!(ix.delete(n, l).expect("delete"));
    assert_eq!(at(&ix, "192.0.2.200"), Some(net("192.0.0.0/16")));
    assert_eq!(at(&ix, "192.0.2.3"), Some(net("192.0.0.0/16")));
    assert_eq!(
        ix.parent_of(net("192.0.2.0/28").0, 28),
        ix.index_of(net("192.0.0.0/16").0, 16)
    );
    // Adding it back takes them again.
    assert!(ix.upsert(n, l, &value(0)).expect("upsert"));
    assert_eq!(at(&ix, "192.0.2.3"), Some(net("192.0.2.0/24")));
    assert_eq!(ix.parent_of(net("192.0.2.0/28").0, 28), ix.index_of(n, l));
    // A short prefix fills 65,536 blocks and gives them back.
    let (n8, l8) = net("10.0.0.0/8");
    assert!(ix.upsert(n8, l8, &value(0)).expect("upsert"));
    assert_eq!(at(&ix, "10.255.255.255"), Some(net("10.0.0.0/8")));
    assert!(ix.delete(n8, l8).expect("delete"));
    assert_eq!(at(&ix, "10.255.255.255"), None);
    let first = direct::slot_of(n8, direct::LARGE_BITS) as usize;
    let left = (first..first + 65_536)
        .filter(|s| ix.direct().load(*s) != 0)
        .count();
    assert_eq!(left, 0, "slots of the removed /8 still set");
}

#[test]
fn zero_length_prefix_covers_everything() {
    let mut ix = index(direct::SMALL_BITS, 8);
    assert!(ix.upsert(0, 0, &value(0)).expect("upsert /0"));
    let (n, l) = net("198.51.100.0/24");
    assert!(ix.upsert(n, l, &value(0)).expect("upsert"));
    assert_eq!(
        ix.lookup(addr("203.0.113.7"), 1).map(|i| ix.rule_at(i)),
        Some((0, 0))
    );
    assert_eq!(
        ix.lookup(addr("198.51.100.7"), 1).map(|i| ix.rule_at(i)),
        Some((n, l))
    );
    assert_eq!(ix.parent_of(n, l), ix.index_of(0, 0));
    assert!(ix.delete(0, 0).expect("delete /0"));
    assert_eq!(ix.lookup(addr("203.0.113.7"), 1), None);
    assert_eq!(ix.parent_of(n, l), Some(0));
}

#[test]
fn full_index_refuses_and_recovers() {
    let mut ix = index(direct::SMALL_BITS, 3);
    for text in ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/28"] {
        let (n, l) = net(text);
        assert!(ix.upsert(n, l, &value(0)).expect("upsert"));
    }
    let (n, l) = net("10.2.0.0/16");
    let err = ix.upsert(n, l, &value(0)).expect_err("full");
    assert!(
        matches!(&err, aya::maps::MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOSPC)),
        "{err:?}"
    );
    // Replacing still works when full.
    assert!(
        !ix.upsert(net("10.1.0.0/16").0, 16, &value(5))
            .expect("replace")
    );
    // A batch stops exactly where room runs out, and leaves nothing behind.
    let (m, ml) = net("10.1.0.0/16");
    assert!(ix.delete(m, ml).expect("delete"));
    let items = [net("10.1.0.0/16"), net("10.3.0.0/16"), net("10.4.0.0/16")];
    let (written, error) = ix.write_many(&items, &[value(0); 3]);
    assert_eq!(written, 1);
    assert_eq!(error.map(|e| e.raw_os_error()), Some(Some(libc::ENOSPC)));
    assert_eq!(ix.len(), 3);
    assert_eq!(
        ix.lookup(addr("10.3.0.1"), 1).map(|i| ix.rule_at(i)),
        Some(net("10.0.0.0/8"))
    );
    // The freed index went back to the pool and came out again.
    let in_use = (1..=3)
        .filter(|i| ix.shared_rules().read(*i).in_use != 0)
        .count();
    assert_eq!(in_use, 3);
}

#[test]
fn long_map_full_rolls_the_batch_back() {
    // Room for four rules but for one long one only: the second long rule
    // of the batch stops it, and the short rule after it is not kept.
    let mut ix = Prefix4Index::open(
        Region::heap(1 << direct::SMALL_BITS),
        Region::heap(5),
        MemTable::new(1),
    )
    .expect("open");
    let items = [net("10.0.0.0/20"), net("10.0.16.0/20"), net("10.1.0.0/16")];
    let (written, error) = ix.write_many(&items, &[value(0); 3]);
    assert_eq!(written, 1);
    assert_eq!(error.map(|e| e.raw_os_error()), Some(Some(libc::E2BIG)));
    assert_eq!(ix.len(), 1);
    assert_eq!(ix.lookup(addr("10.1.0.1"), 1), None);
    let (n, l) = net("10.1.0.0/16");
    assert!(ix.upsert(n, l, &value(0)).expect("room is back"));
}

#[test]
fn open_repairs_what_a_crash_leaves() {
    let mut ix = index(direct::SMALL_BITS, 32);
    let mut model = Model::default();
    for text in [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.128/25",
        "10.1.2.192/26",
        "10.2.0.0/20",
    ] {
        let (n, l) = net(text);
        ix.upsert(n, l, &value(0)).expect("upsert");
        model.add(n, l, 0);
    }
    // A crash between steps of several changes: a slot not yet painted, a
    // parent not yet moved, a long entry not yet written, one of a rule
    // already freed, and an element that cannot be a rule.
    let slot = direct::slot_of(addr("10.1.2.1"), direct::SMALL_BITS) as usize;
    ix.direct().store(slot, 0);
    let (n24, _) = net("10.1.2.0/24");
    let i24 = ix.index_of(n24, 24).expect("present");
    // SAFETY: test memory; in bounds.
    unsafe {
        let element = ix.shared_rules().ptr(i24 as usize);
        (*element).parent = 0;
    }
    let (n25, _) = net("10.1.2.128/25");
    ix.long_map()
        .remove(&LongKey4 {
            prefix_len: 25,
            network: n25,
        })
        .expect("remove");
    ix.long_map()
        .insert(
            &LongKey4 {
                prefix_len: 30,
                network: addr("10.9.9.0"),
            },
            &7,
        )
        .expect("insert");
    let junk = ix.shared_rules().len() - 1;
    // SAFETY: as above.
    unsafe {
        let element = ix.shared_rules().ptr(junk);
        *element = PrefixRule4 {
            network: addr("10.0.0.1"),
            in_use: 1,
            value: value(0),
            ..PrefixRule4::zeroed()
        };
        (*element).value.prefix_len = 8;
        let zero = ix.shared_rules().ptr(0);
        (*zero).parent = junk as u32 + 1;
    }
    let mut ix = reopen(ix);
    let mut rng = Rng(9);
    check(&mut ix, &model, &mut rng, 1);
    assert_eq!(ix.shared_rules().read(junk).in_use, 0, "junk element freed");
}
