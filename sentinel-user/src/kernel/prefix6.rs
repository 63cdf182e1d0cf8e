//! The IPv6 prefix index of one list: a filter and a hash map of prefixes
//! keyed by (length, network) (laid out as `sentinel_common::prefix`
//! describes), and the counts that keep the filter exact.
//!
//! A slot names the lengths of the prefixes whose top 32 bits hash there
//! (the one length exactly when they all have one, else their classes),
//! and has its host bit set while a host hashes there: the daemon counts,
//! per slot and length, the prefixes and hosts (length 128) that hash
//! there. The program only ever probes what a slot names, so a length
//! named too many is a wasted probe and a length missing would hide
//! entries: a slot gains a length after the entry is written and loses it
//! after it is removed. The prefix map is the truth the filter
//! is rebuilt from at start ([`Prefix6Index::open`] for prefixes,
//! [`RuleMap::restore_hosts`] for hosts).

use std::{io, net::Ipv6Addr};

use aya::maps::MapError;
use ipnet::{IpNet, Ipv6Net};
use sentinel_common::{
    Meta, RuleValue,
    prefix::{PrefixKey6, filter},
};
use tracing::warn;

use super::{
    region::Region,
    rule_maps::{RuleMap, wrong_family},
    table::Table,
};

type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The length counted for hosts.
const HOST_LEN: u8 = 128;

/// A change of one slot: a length (or the host length) that its first
/// entry just gained, or that its last entry just lost.
#[derive(Clone, Copy)]
enum Change {
    Gained(u32, u8),
    Lost(u32, u8),
}

fn parts(prefix: &IpNet) -> Result<(u128, u8), MapError> {
    match prefix {
        IpNet::V6(net) => Ok((u128::from(net.network()), net.prefix_len())),
        IpNet::V4(_) => Err(wrong_family()),
    }
}

fn key_of(network: u128, len: u8) -> PrefixKey6 {
    PrefixKey6::new(u32::from(len), network)
}

fn mask(len: u8) -> u128 {
    match len {
        0 => 0,
        len => u128::MAX << (128 - u32::from(len)),
    }
}

/// The key of `counts` for a slot and a length.
fn count_key(slot: u32, len: u8) -> u64 {
    (u64::from(slot) << 8) | u64::from(len)
}

/// The top 32 bits of an address, host byte order.
fn top(network: u128) -> u32 {
    (network >> 96) as u32
}

/// The IPv6 prefix index of one list; `P` is its prefix map.
pub struct Prefix6Index<P> {
    bits: u32,
    filter: Region<u32>,
    prefixes: P,
    present: FastSet<(u128, u8)>,
    /// (slot << 8 | length) -> entries of that length (128: hosts) hashing
    /// to that slot; lengths from /32 only.
    counts: FastMap<u64, u32>,
    /// Prefixes per length (/0 to /127).
    lengths: [u32; 128],
}

impl<P: Table<PrefixKey6, RuleValue>> Prefix6Index<P> {
    /// Takes the index's maps and reads the prefixes. The filter is left as
    /// found until [`RuleMap::restore_hosts`] brings the hosts and rewrites
    /// it (the rule tables call it at once): rewriting it without the
    /// hosts would hide them from the program until then.
    pub fn open(filter: Region<u32>, prefixes: P) -> Result<Self, MapError> {
        let bits = (filter::MIN_BITS..=filter::MAX_BITS)
            .find(|b| filter.len() == 1 << b)
            .ok_or_else(|| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "IPv6 prefix index",
                    io_error: io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a filter of {} slots", filter.len()),
                    ),
                })
            })?;
        let mut index = Self {
            bits,
            filter,
            prefixes,
            present: FastSet::default(),
            counts: FastMap::default(),
            lengths: [0; 128],
        };
        for (key, _) in index.prefixes.entries()? {
            let network = key.network();
            let len = key.prefix_len().unwrap_or(u32::MAX);
            if len >= 128 || network & mask(len as u8) != network {
                warn!(
                    network = %Ipv6Addr::from(network),
                    len,
                    "dropping an IPv6 prefix entry that cannot be one (no length marker, or host bits)"
                );
                match index.prefixes.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            let len = len as u8;
            if index.present.insert((network, len)) {
                index.count(network, len, 1);
            }
        }
        Ok(index)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.present.len()
    }

    /// Adds `delta` (+1 or -1) to the counts of a prefix (`len` < 128) or
    /// host (`len` 128); returns the slot change it makes, if any. Lengths
    /// under /32 have no slot (they are probed for every address).
    fn count(&mut self, network: u128, len: u8, delta: i32) -> Option<Change> {
        if len < HOST_LEN {
            let n = &mut self.lengths[len as usize];
            *n = n.saturating_add_signed(delta);
        }
        if u32::from(len) < filter::FIRST_LEN {
            return None;
        }
        let slot = filter::slot_of(top(network), self.bits);
        let key = count_key(slot, len);
        let n = self.counts.entry(key).or_insert(0);
        let before = *n;
        *n = n.saturating_add_signed(delta);
        let after = *n;
        if after == 0 {
            self.counts.remove(&key);
        }
        match (before, after) {
            (0, 1..) => Some(Change::Gained(slot, len)),
            (1.., 0) => Some(Change::Lost(slot, len)),
            _ => None,
        }
    }

    /// Writes a slot change. A lost prefix length rebuilds the slot's
    /// prefix part from the counts of the lengths the list still has.
    fn apply(&self, change: Option<Change>) {
        let Some(change) = change else { return };
        let (slot, value) = match change {
            Change::Gained(slot, HOST_LEN) => {
                (slot, self.filter.load(slot as usize) | filter::HOST)
            }
            Change::Lost(slot, HOST_LEN) => (slot, self.filter.load(slot as usize) & !filter::HOST),
            Change::Gained(slot, len) => (
                slot,
                filter::with_length(self.filter.load(slot as usize), u32::from(len)),
            ),
            Change::Lost(slot, _) => {
                let host = self.filter.load(slot as usize) & filter::HOST;
                let value = (filter::FIRST_LEN as u8..HOST_LEN)
                    .filter(|&l| {
                        self.lengths[l as usize] != 0
                            && self.counts.contains_key(&count_key(slot, l))
                    })
                    .fold(host, |value, l| filter::with_length(value, u32::from(l)));
                (slot, value)
            }
        };
        self.filter.store(slot as usize, value);
    }

    /// Rewrites every slot from the counts.
    fn rewrite(&mut self) -> Result<(), MapError> {
        if self.counts.is_empty() {
            self.filter.sync(None)?;
            self.filter.unmap();
            return Ok(());
        }
        let mut want = vec![0u32; self.filter.len()];
        for key in self.counts.keys() {
            let (slot, len) = ((key >> 8) as usize, (key & 0xff) as u8);
            want[slot] = match len {
                HOST_LEN => want[slot] | filter::HOST,
                len => filter::with_length(want[slot], u32::from(len)),
            };
        }
        self.filter.ensure_mapped()?;
        self.filter.sync(Some(&want))?;
        Ok(())
    }

    /// An index without entries or hosts keeps its filter unmapped (see
    /// `region`); it is mapped before any change.
    fn unmap_if_empty(&mut self) {
        if self.counts.is_empty() {
            self.filter.unmap();
        }
    }

    /// Adds or replaces one prefix; `true` when it was added.
    pub fn upsert(&mut self, network: u128, len: u8, value: &RuleValue) -> Result<bool, MapError> {
        self.filter.ensure_mapped()?;
        let result = self.upsert_mapped(network, len, value);
        self.unmap_if_empty();
        result
    }

    fn upsert_mapped(
        &mut self,
        network: u128,
        len: u8,
        value: &RuleValue,
    ) -> Result<bool, MapError> {
        let mut value = *value;
        value.prefix_len = u32::from(len);
        self.prefixes.insert(&key_of(network, len), &value)?;
        if !self.present.insert((network, len)) {
            return Ok(false);
        }
        let change = self.count(network, len, 1);
        self.apply(change);
        Ok(true)
    }

    /// Removes one prefix; `false` when it was not there.
    pub fn delete(&mut self, network: u128, len: u8) -> Result<bool, MapError> {
        if !self.present.contains(&(network, len)) {
            return Ok(false);
        }
        match self.prefixes.remove(&key_of(network, len)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
        self.present.remove(&(network, len));
        // Mapped already: the index holds an entry.
        let change = self.count(network, len, -1);
        self.apply(change);
        self.unmap_if_empty();
        Ok(true)
    }

    /// Adds or replaces many prefixes with batched map updates, in order.
    #[cfg(test)]
    pub fn write_many(
        &mut self,
        items: &[(u128, u8)],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        self.write_many_as(items, values, false)
    }

    /// `write_many`; `fresh`: none of `items` is present, so the prefix map
    /// may write them on several threads.
    fn write_many_as(
        &mut self,
        items: &[(u128, u8)],
        values: &[RuleValue],
        fresh: bool,
    ) -> (usize, Option<io::Error>) {
        let count = items.len().min(values.len());
        let keys: Vec<PrefixKey6> = items[..count].iter().map(|(n, l)| key_of(*n, *l)).collect();
        let values: Vec<RuleValue> = items[..count]
            .iter()
            .zip(values)
            .map(|((_, len), value)| RuleValue {
                prefix_len: u32::from(*len),
                ..*value
            })
            .collect();
        if let Err(e) = self.filter.ensure_mapped() {
            return (0, Some(io::Error::other(e.to_string())));
        }
        let (written, error) = if fresh {
            self.prefixes.insert_new_batch(&keys, &values)
        } else {
            self.prefixes.insert_batch(&keys, &values)
        };
        self.present.reserve(written);
        for &(network, len) in &items[..written] {
            if self.present.insert((network, len)) {
                let change = self.count(network, len, 1);
                self.apply(change);
            }
        }
        self.unmap_if_empty();
        (written, error)
    }

    /// [`RuleMap::update_batch`] of IPv6 prefixes; a prefix of the other
    /// family stops it.
    fn write_prefixes(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
        fresh: bool,
    ) -> (usize, Option<io::Error>) {
        let mut items = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            match parts(prefix) {
                Ok(item) => items.push(item),
                Err(_) => {
                    let (written, error) = self.write_many_as(&items, values, fresh);
                    return (
                        written,
                        error.or(Some(io::Error::from_raw_os_error(libc::EAFNOSUPPORT))),
                    );
                }
            }
        }
        self.write_many_as(&items, values, fresh)
    }

    /// The lengths the program probes, as 128-bit masks: those under /32
    /// (for every address) and those from /32 (narrowing a slot's classes).
    fn lengths_meta(&self) -> ([u64; 2], [u64; 2]) {
        let mut always = 0u128;
        let mut filtered = 0u128;
        for (len, n) in self.lengths.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            if (len as u32) < filter::FIRST_LEN {
                always |= 1 << len;
            } else {
                filtered |= 1 << len;
            }
        }
        let halves = |m: u128| [m as u64, (m >> 64) as u64];
        (halves(always), halves(filtered))
    }
}

impl<P: Table<PrefixKey6, RuleValue>> RuleMap for Prefix6Index<P> {
    fn get(&self, prefix: &IpNet) -> Result<Option<RuleValue>, MapError> {
        let (network, len) = parts(prefix)?;
        if !self.present.contains(&(network, len)) {
            return Ok(None);
        }
        self.prefixes.get(&key_of(network, len))
    }

    fn insert(&mut self, prefix: &IpNet, value: &RuleValue) -> Result<(), MapError> {
        let (network, len) = parts(prefix)?;
        self.upsert(network, len, value).map(|_| ())
    }

    fn remove(&mut self, prefix: &IpNet) -> Result<(), MapError> {
        let (network, len) = parts(prefix)?;
        match self.delete(network, len)? {
            true => Ok(()),
            false => Err(MapError::KeyNotFound),
        }
    }

    fn update_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        self.write_prefixes(prefixes, values, false)
    }

    fn insert_new_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        self.write_prefixes(prefixes, values, true)
    }

    fn dump(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError> {
        Ok(self
            .prefixes
            .entries()?
            .into_iter()
            .filter_map(|(key, value)| {
                let len = u8::try_from(key.prefix_len()?).ok()?;
                Ipv6Net::new(Ipv6Addr::from(key.network()), len)
                    .ok()
                    .map(|net| (IpNet::V6(net), value))
            })
            .collect())
    }

    fn capacity(&self) -> u32 {
        self.prefixes.capacity()
    }

    fn describe(&self, meta: &mut Meta, list: usize) {
        let (always, lengths) = self.lengths_meta();
        if let Some(m) = meta.v6.get_mut(list) {
            m.filter_bits = self.bits;
            m.always = always;
            m.lengths = lengths;
        }
    }

    fn hosts_changed(&mut self, hosts: &[IpNet], present: bool) -> Result<(), MapError> {
        self.filter.ensure_mapped()?;
        for host in hosts {
            if let IpNet::V6(net) = host {
                let delta = if present { 1 } else { -1 };
                let change = self.count(u128::from(net.addr()), HOST_LEN, delta);
                self.apply(change);
            }
        }
        self.unmap_if_empty();
        Ok(())
    }

    fn restore_hosts(&mut self, hosts: &[IpNet]) -> Result<(), MapError> {
        self.counts
            .retain(|key, _| key & 0xff != u64::from(HOST_LEN));
        for host in hosts {
            if let IpNet::V6(net) = host {
                // Counting only: the rewrite below sets the bits.
                let _ = self.count(u128::from(net.addr()), HOST_LEN, 1);
            }
        }
        self.rewrite()
    }
}

#[cfg(test)]
mod tests;
