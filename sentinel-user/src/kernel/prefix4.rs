//! The IPv4 prefix index of one list: a direct table, a rules array and a
//! long-prefix map (laid out as `sentinel_common::prefix` describes), and
//! the bookkeeping that keeps them consistent as rules come and go.
//!
//! Invariants, which every change restores before it returns:
//!
//! - each slot's rule is the longest rule of at most `bits` bits covering
//!   the slot's block (0: none), and its longer bits name exactly the
//!   lengths of the longer rules inside the block;
//! - each rule's parent is the longest rule strictly covering it (0: none);
//! - the long map holds (length, network) -> index for every rule longer
//!   than `bits`.
//!
//! The program may read at any moment, so changes are ordered to show it
//! only consistent states: a rule's element is written before anything
//! points to it, and everything that points to a rule is repointed before
//! its element is freed. Freed indexes are reused oldest first.
//!
//! The daemon's copy of what it needs to walk the structure (network,
//! length, parent per index) lives in `nodes`, so that walks do not read
//! the 152-byte elements; the kernel's elements are the truth it is rebuilt
//! from at start ([`Prefix4Index::open`]), which also repairs whatever a
//! crash in the middle of a change left behind.

use std::{
    collections::{BTreeSet, VecDeque},
    io,
    net::Ipv4Addr,
    sync::atomic::{Ordering, fence},
};

use aya::maps::MapError;
use ipnet::{IpNet, Ipv4Net};
use sentinel_common::{
    Meta, RuleValue,
    prefix::{LongKey4, PrefixRule4, direct},
};
use tracing::warn;

use super::{
    region::Region,
    rule_maps::{RuleMap, wrong_family},
    table::Table,
};

type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// `Node::len` of an index that holds no rule.
const FREE: u8 = u8::MAX;

/// Rules on a chain of parents: one per length.
const MAX_CHAIN: usize = 33;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Node {
    network: u32,
    parent: u32,
    len: u8,
}

impl Node {
    const FREE: Node = Node {
        network: 0,
        parent: 0,
        len: FREE,
    };

    /// One past the last address of the rule, as a u64 (a /0 ends at 2^32).
    fn end(&self) -> u64 {
        u64::from(self.network) + (1u64 << (32 - u32::from(self.len)))
    }
}

/// A sort key: by network, then by length.
fn key(network: u32, len: u8) -> u64 {
    (u64::from(network) << 6) | u64::from(len)
}

fn parts(prefix: &IpNet) -> Result<(u32, u8), MapError> {
    match prefix {
        IpNet::V4(net) => Ok((u32::from(net.network()), net.prefix_len())),
        IpNet::V6(_) => Err(wrong_family()),
    }
}

fn layout_error(detail: String) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError {
        call: "IPv4 prefix index",
        io_error: io::Error::new(io::ErrorKind::InvalidData, detail),
    })
}

fn full() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

fn io_of(error: MapError) -> io::Error {
    match error {
        MapError::SyscallError(e) => e.io_error,
        other => io::Error::other(other.to_string()),
    }
}

/// The IPv4 prefix index of one list; `L` is its long-prefix map.
pub struct Prefix4Index<L> {
    bits: u32,
    direct: Region<u32>,
    rules: Region<PrefixRule4>,
    long: L,
    /// Per rule index below `next`.
    nodes: Vec<Node>,
    by_key: FastMap<u64, u32>,
    /// Keys of the rules longer than `bits`, in address order: the rules
    /// inside a block or a prefix are a range of it.
    longer: BTreeSet<u64>,
    free: VecDeque<u32>,
    /// One past the highest index handed out; also kept in element 0.
    next: u32,
}

impl<L: Table<LongKey4, u32>> Prefix4Index<L> {
    /// Takes the index's three maps, reads the rules they hold and repairs
    /// the table, the parents and the long map from them.
    pub fn open(
        direct: Region<u32>,
        rules: Region<PrefixRule4>,
        long: L,
    ) -> Result<Self, MapError> {
        let bits = match direct.len() {
            n if n == 1 << direct::SMALL_BITS => direct::SMALL_BITS,
            n if n == 1 << direct::LARGE_BITS => direct::LARGE_BITS,
            n => return Err(layout_error(format!("a direct table of {n} slots"))),
        };
        if rules.len() < 2 || rules.len() - 1 > direct::max_rules(bits) as usize {
            return Err(layout_error(format!(
                "{} rules for a direct table of {bits} bits",
                rules.len().saturating_sub(1)
            )));
        }
        let mut index = Self {
            bits,
            direct,
            rules,
            long,
            nodes: Vec::new(),
            by_key: FastMap::default(),
            longer: BTreeSet::new(),
            free: VecDeque::new(),
            next: 1,
        };
        index.load()?;
        index.repair()?;
        index.unmap_if_empty();
        Ok(index)
    }

    /// Maps the table and the rules array: done before any change, so that
    /// nothing fails halfway through one.
    fn map_all(&mut self) -> Result<(), MapError> {
        self.direct.ensure_mapped()?;
        self.rules.ensure_mapped()
    }

    /// An index without rules keeps nothing mapped (see `region`).
    fn unmap_if_empty(&mut self) {
        if self.by_key.is_empty() {
            self.direct.unmap();
            self.rules.unmap();
        }
    }

    /// Most rules the index holds.
    pub fn capacity(&self) -> u32 {
        (self.rules.len() - 1) as u32
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Reads every element in use below the high-water mark (without
    /// mapping the array when there is none). Elements that cannot be rules
    /// (a length over 32, host bits set, a duplicate) are freed with a
    /// warning.
    fn load(&mut self) -> Result<(), MapError> {
        let capacity = self.rules.len();
        let mut next = 1usize;
        let mut in_use: Vec<(u32, PrefixRule4)> = Vec::new();
        self.rules.scan(|first, items| {
            for (offset, element) in items.iter().enumerate() {
                let index = first + offset;
                if index == 0 {
                    next = (element.parent as usize).clamp(1, capacity);
                    continue;
                }
                if index >= next {
                    return false;
                }
                if element.in_use != 0 {
                    in_use.push((index as u32, *element));
                }
            }
            true
        })?;
        self.next = next as u32;
        self.nodes = vec![Node::FREE; next];
        if !in_use.is_empty() {
            self.map_all()?;
        }
        let mut used = vec![false; next];
        for (index, element) in in_use {
            let len = element.value.prefix_len;
            let valid = len <= 32 && element.network & direct::mask(len) == element.network;
            let k = key(element.network, len as u8);
            if !valid || self.by_key.contains_key(&k) {
                warn!(
                    index,
                    network = %Ipv4Addr::from(element.network),
                    len,
                    "dropping an IPv4 prefix rule that cannot be one (bad length, host bits, or a duplicate)"
                );
                self.clear(index);
                continue;
            }
            used[index as usize] = true;
            self.nodes[index as usize] = Node {
                network: element.network,
                parent: element.parent,
                len: len as u8,
            };
            self.by_key.insert(k, index);
            if u32::from(len as u8) > self.bits {
                self.longer.insert(k);
            }
        }
        self.free = (1..next as u32).filter(|i| !used[*i as usize]).collect();
        Ok(())
    }

    /// Recomputes parents, the long map and every slot from the rules, and
    /// writes whatever differs.
    fn repair(&mut self) -> Result<(), MapError> {
        // Parents: in address order, the open rules containing the current
        // one form a stack; its top is the current rule's parent.
        let mut order: Vec<(u64, u32)> = self.by_key.iter().map(|(k, i)| (*k, *i)).collect();
        order.sort_unstable();
        let mut stack: Vec<u32> = Vec::new();
        for &(_, index) in &order {
            let node = self.nodes[index as usize];
            while let Some(&top) = stack.last() {
                if self.nodes[top as usize].end() <= u64::from(node.network) {
                    stack.pop();
                } else {
                    break;
                }
            }
            let parent = stack.last().copied().unwrap_or(0);
            if node.parent != parent {
                self.set_parent(index, parent);
            }
            stack.push(index);
        }

        // The long map: exactly one entry per long rule.
        let mut wanted: FastMap<LongKey4, u32> = self
            .longer
            .iter()
            .map(|k| {
                let index = self.by_key[k];
                let node = self.nodes[index as usize];
                (
                    LongKey4 {
                        prefix_len: u32::from(node.len),
                        network: node.network,
                    },
                    index,
                )
            })
            .collect();
        for (k, v) in self.long.entries()? {
            match wanted.get(&k) {
                Some(want) if *want == v => {
                    wanted.remove(&k);
                }
                Some(_) => {}
                None => match self.long.remove(&k) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(e),
                },
            }
        }
        let (keys, values): (Vec<LongKey4>, Vec<u32>) = wanted.into_iter().unzip();
        if let (_, Some(e)) = self.long.insert_batch(&keys, &values) {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error: e,
            }));
        }

        // Slots: paint rules shortest first, so that longer ones win.
        if self.by_key.is_empty() {
            self.direct.sync(None)?;
            return Ok(());
        }
        let mut want = vec![0u32; self.direct.len()];
        let mut by_len: Vec<Vec<u32>> = vec![Vec::new(); self.bits as usize + 1];
        for &(_, index) in &order {
            let node = self.nodes[index as usize];
            if u32::from(node.len) <= self.bits {
                by_len[node.len as usize].push(index);
            }
        }
        for rules in &by_len {
            for &index in rules {
                let (first, count) = self.block_range(&self.nodes[index as usize]);
                want[first..first + count].fill(index);
            }
        }
        for k in &self.longer {
            let node = self.nodes[self.by_key[k] as usize];
            let slot = direct::slot_of(node.network, self.bits) as usize;
            want[slot] |= direct::slot(0, self.longer_bit(node.len), self.bits);
        }
        self.direct.sync(Some(&want))?;
        Ok(())
    }

    /// The slots a rule of at most `bits` bits covers: first and count.
    fn block_range(&self, node: &Node) -> (usize, usize) {
        let first = direct::slot_of(node.network, self.bits) as usize;
        (first, 1usize << (self.bits - u32::from(node.len)))
    }

    /// The longer-lengths bit of a length over `bits`.
    fn longer_bit(&self, len: u8) -> u32 {
        1 << (u32::from(len) - self.bits - 1)
    }

    /// Indexes of the long rules whose networks lie in `[start, end)`.
    fn long_rules_in(&self, start: u32, end: u64) -> Vec<u32> {
        self.longer
            .range(key(start, 0)..(end << 6))
            .map(|k| self.by_key[k])
            .collect()
    }

    fn set_parent(&mut self, index: u32, parent: u32) {
        self.nodes[index as usize].parent = parent;
        // SAFETY: the pointer is in bounds (`Region::ptr`) and the field is
        // 4-byte aligned; the program reads it with aligned loads.
        unsafe {
            let element = self.rules.ptr(index as usize);
            std::ptr::write_volatile(&raw mut (*element).parent, parent);
        }
    }

    /// Writes a rule's value in place, field by field.
    fn write_value(&self, index: u32, value: &RuleValue) {
        let element = self.rules.ptr(index as usize);
        // SAFETY: in bounds and aligned; single aligned stores per field,
        // so the program never sees a torn expiry or hit count.
        unsafe {
            let v = &raw mut (*element).value;
            std::ptr::write_volatile(&raw mut (*v).expires_at_ns, value.expires_at_ns);
            std::ptr::write_volatile(&raw mut (*v).hits, value.hits);
            std::ptr::write_volatile(&raw mut (*v).last_hit_ns, value.last_hit_ns);
            std::ptr::write_volatile(&raw mut (*v).created_at_unix_s, value.created_at_unix_s);
            std::ptr::write_volatile(&raw mut (*v).prefix_len, value.prefix_len);
            std::ptr::write_volatile(&raw mut (*v)._pad, value._pad);
            std::ptr::write_volatile(&raw mut (*v).source, value.source);
            std::ptr::write_volatile(&raw mut (*v).reason, value.reason);
        }
    }

    /// Fills a free element and marks it in use, last.
    fn write_rule(&self, index: u32, network: u32, len: u8, value: &RuleValue) {
        let mut value = *value;
        value.prefix_len = u32::from(len);
        self.write_value(index, &value);
        let element = self.rules.ptr(index as usize);
        // SAFETY: as in `write_value`.
        unsafe {
            std::ptr::write_volatile(&raw mut (*element).network, network);
            std::ptr::write_volatile(&raw mut (*element).parent, 0);
            fence(Ordering::Release);
            std::ptr::write_volatile(&raw mut (*element).in_use, 1);
        }
    }

    /// Marks an element free, first.
    fn clear(&self, index: u32) {
        let element = self.rules.ptr(index as usize);
        // SAFETY: as in `write_value`.
        unsafe { std::ptr::write_volatile(&raw mut (*element).in_use, 0) };
        fence(Ordering::Release);
    }

    /// A free index, oldest freed first, else a fresh one (recorded in
    /// element 0 before it is used, so that a restart reads that far).
    fn alloc(&mut self) -> Option<u32> {
        if let Some(index) = self.free.pop_front() {
            return Some(index);
        }
        if (self.next as usize) >= self.rules.len() {
            return None;
        }
        let index = self.next;
        self.next += 1;
        // SAFETY: element 0 is in bounds; only its `parent` field is used.
        unsafe {
            let zero = self.rules.ptr(0);
            std::ptr::write_volatile(&raw mut (*zero).parent, self.next);
        }
        self.nodes.push(Node::FREE);
        Some(index)
    }

    fn release(&mut self, index: u32) {
        self.clear(index);
        self.nodes[index as usize] = Node::FREE;
        self.free.push_back(index);
    }

    /// The longest rule strictly covering `(network, len)`, among the rules
    /// linked so far.
    fn cover(&self, network: u32, len: u8) -> u32 {
        let slot = self
            .direct
            .load(direct::slot_of(network, self.bits) as usize);
        if u32::from(len) > self.bits {
            // Longer rules of the same block that are shorter than `len`,
            // longest first, then the block's rule.
            let mut longer = direct::longer(slot, self.bits) & (self.longer_bit(len) - 1);
            while longer != 0 {
                let j = 31 - longer.leading_zeros();
                longer &= !(1 << j);
                let l = (self.bits + 1 + j) as u8;
                if let Some(&index) = self.by_key.get(&key(network & direct::mask(l.into()), l)) {
                    return index;
                }
            }
            return direct::rule(slot, self.bits);
        }
        // The block's rule covers the first slot of the new one: it is
        // either a cover or inside the new rule, and then its chain of
        // parents leads out to the cover.
        let mut candidate = direct::rule(slot, self.bits);
        for _ in 0..MAX_CHAIN {
            if candidate == 0 || self.nodes[candidate as usize].len < len {
                return candidate;
            }
            candidate = self.nodes[candidate as usize].parent;
        }
        0
    }

    /// Makes a written rule (its node filled in, its parent set) part of
    /// the structure: slots, children's parents, longer bits.
    fn link(&mut self, index: u32) {
        let node = self.nodes[index as usize];
        let old = node.parent;
        if u32::from(node.len) > self.bits {
            let slot_index = direct::slot_of(node.network, self.bits) as usize;
            let slot = self.direct.load(slot_index);
            // Rules inside this one are longer and in the same block: none
            // when the block has no longer length (nearly always), and then
            // the ordered set need not be searched.
            let above = direct::longer(slot, self.bits) & !((self.longer_bit(node.len) << 1) - 1);
            if above != 0 {
                for child in self.long_rules_in(node.network, node.end()) {
                    if child != index
                        && self.nodes[child as usize].len > node.len
                        && self.nodes[child as usize].parent == old
                    {
                        self.set_parent(child, index);
                    }
                }
            }
            let longer = direct::longer(slot, self.bits) | self.longer_bit(node.len);
            self.direct.store(
                slot_index,
                direct::slot(direct::rule(slot, self.bits), longer, self.bits),
            );
            self.longer.insert(key(node.network, node.len));
            return;
        }
        let (first, count) = self.block_range(&node);
        for slot_index in first..first + count {
            let slot = self.direct.load(slot_index);
            let best = direct::rule(slot, self.bits);
            let longer = direct::longer(slot, self.bits);
            if best == 0 || self.nodes[best as usize].len < node.len {
                // The block's rule was the cover (`old`): the new rule takes
                // its place, and the top long rules of the block move under it.
                self.direct
                    .store(slot_index, direct::slot(index, longer, self.bits));
                if longer != 0 {
                    let start = (slot_index as u32) << (32 - self.bits);
                    let end = u64::from(start) + (1u64 << (32 - self.bits));
                    for child in self.long_rules_in(start, end) {
                        if self.nodes[child as usize].parent == old {
                            self.set_parent(child, index);
                        }
                    }
                }
            } else {
                // A longer rule inside the new one owns the block: the top
                // of its chain inside the new rule moves under it.
                let mut top = best;
                for _ in 0..MAX_CHAIN {
                    let parent = self.nodes[top as usize].parent;
                    if parent == old {
                        self.set_parent(top, index);
                        break;
                    }
                    if parent == index || parent == 0 {
                        break;
                    }
                    top = parent;
                }
            }
        }
    }

    /// Takes a rule out of the structure, its parent taking its place.
    fn unlink(&mut self, index: u32) {
        let node = self.nodes[index as usize];
        let up = node.parent;
        if u32::from(node.len) > self.bits {
            let slot_index = direct::slot_of(node.network, self.bits) as usize;
            let above = direct::longer(self.direct.load(slot_index), self.bits)
                & !((self.longer_bit(node.len) << 1) - 1);
            if above != 0 {
                for child in self.long_rules_in(node.network, node.end()) {
                    if self.nodes[child as usize].parent == index {
                        self.set_parent(child, up);
                    }
                }
            }
            self.longer.remove(&key(node.network, node.len));
            let start = (slot_index as u32) << (32 - self.bits);
            let end = u64::from(start) + (1u64 << (32 - self.bits));
            let same_len_left = self
                .long_rules_in(start, end)
                .iter()
                .any(|i| self.nodes[*i as usize].len == node.len);
            if !same_len_left {
                let slot = self.direct.load(slot_index);
                let longer = direct::longer(slot, self.bits) & !self.longer_bit(node.len);
                self.direct.store(
                    slot_index,
                    direct::slot(direct::rule(slot, self.bits), longer, self.bits),
                );
            }
            return;
        }
        let (first, count) = self.block_range(&node);
        for slot_index in first..first + count {
            let slot = self.direct.load(slot_index);
            let best = direct::rule(slot, self.bits);
            let longer = direct::longer(slot, self.bits);
            if best == index {
                self.direct
                    .store(slot_index, direct::slot(up, longer, self.bits));
                if longer != 0 {
                    let start = (slot_index as u32) << (32 - self.bits);
                    let end = u64::from(start) + (1u64 << (32 - self.bits));
                    for child in self.long_rules_in(start, end) {
                        if self.nodes[child as usize].parent == index {
                            self.set_parent(child, up);
                        }
                    }
                }
            } else if best != 0 {
                let mut below = best;
                for _ in 0..MAX_CHAIN {
                    let parent = self.nodes[below as usize].parent;
                    if parent == index {
                        self.set_parent(below, up);
                        break;
                    }
                    if parent == 0 || self.nodes[parent as usize].len <= node.len {
                        break;
                    }
                    below = parent;
                }
            }
        }
    }

    /// Adds or replaces one rule; `true` when it was added.
    pub fn upsert(&mut self, network: u32, len: u8, value: &RuleValue) -> Result<bool, MapError> {
        self.map_all()?;
        let result = self.upsert_mapped(network, len, value);
        self.unmap_if_empty();
        result
    }

    fn upsert_mapped(
        &mut self,
        network: u32,
        len: u8,
        value: &RuleValue,
    ) -> Result<bool, MapError> {
        if let Some(&index) = self.by_key.get(&key(network, len)) {
            let mut value = *value;
            value.prefix_len = u32::from(len);
            self.write_value(index, &value);
            return Ok(false);
        }
        let index = self.alloc().ok_or_else(|| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "IPv4 prefix rule allocation",
                io_error: full(),
            })
        })?;
        self.write_rule(index, network, len, value);
        self.nodes[index as usize] = Node {
            network,
            parent: 0,
            len,
        };
        if u32::from(len) > self.bits {
            let long_key = LongKey4 {
                prefix_len: u32::from(len),
                network,
            };
            if let Err(e) = self.long.insert(&long_key, &index) {
                self.release(index);
                return Err(e);
            }
        }
        let parent = self.cover(network, len);
        self.set_parent(index, parent);
        self.link(index);
        self.by_key.insert(key(network, len), index);
        Ok(true)
    }

    /// Removes one rule; `false` when it was not there.
    pub fn delete(&mut self, network: u32, len: u8) -> Result<bool, MapError> {
        let Some(&index) = self.by_key.get(&key(network, len)) else {
            return Ok(false);
        };
        // Mapped already: the index holds a rule.
        if u32::from(len) > self.bits {
            let long_key = LongKey4 {
                prefix_len: u32::from(len),
                network,
            };
            match self.long.remove(&long_key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        self.unlink(index);
        self.by_key.remove(&key(network, len));
        self.release(index);
        self.unmap_if_empty();
        Ok(true)
    }

    /// The value of exactly `(network, len)`.
    pub fn value(&self, network: u32, len: u8) -> Option<RuleValue> {
        let index = *self.by_key.get(&key(network, len))?;
        Some(self.rules.read(index as usize).value)
    }

    /// Adds or replaces many rules, in order, as [`RuleMap::update_batch`].
    ///
    /// New rules are written to free elements first, unreferenced; the long
    /// map gets their entries in one batch; then, up to the first that
    /// could not be written, each is linked in input order and each known
    /// one replaced in place. Nothing past that point is left behind.
    #[cfg(test)]
    pub fn write_many(
        &mut self,
        items: &[(u32, u8)],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        self.write_many_as(items, values, false)
    }

    /// `write_many`; `fresh`: the items are distinct and none is present,
    /// which spares looking each one up twice.
    fn write_many_as(
        &mut self,
        items: &[(u32, u8)],
        values: &[RuleValue],
        fresh: bool,
    ) -> (usize, Option<io::Error>) {
        if let Err(e) = self.map_all() {
            return (0, Some(io_of(e)));
        }
        let written = self.write_many_mapped(items, values, fresh);
        self.unmap_if_empty();
        written
    }

    fn write_many_mapped(
        &mut self,
        items: &[(u32, u8)],
        values: &[RuleValue],
        fresh: bool,
    ) -> (usize, Option<io::Error>) {
        enum Plan {
            Known(u32),
            New(u32),
        }
        let count = items.len().min(values.len());
        let mut stop = count;
        let mut error = None;
        let mut plans = Vec::with_capacity(count);
        let mut pending: FastMap<u64, u32> = FastMap::default();
        if !fresh {
            pending.reserve(count);
        }
        self.by_key.reserve(count);
        self.nodes.reserve(count);
        for (position, &(network, len)) in items[..count].iter().enumerate() {
            let k = key(network, len);
            if !fresh && let Some(&index) = self.by_key.get(&k).or_else(|| pending.get(&k)) {
                plans.push(Plan::Known(index));
                continue;
            }
            let Some(index) = self.alloc() else {
                stop = position;
                error = Some(full());
                break;
            };
            if !fresh {
                pending.insert(k, index);
            }
            self.write_rule(index, network, len, &values[position]);
            self.nodes[index as usize] = Node {
                network,
                parent: 0,
                len,
            };
            plans.push(Plan::New(index));
        }

        let mut long_positions = Vec::new();
        let mut long_keys = Vec::new();
        let mut long_values = Vec::new();
        for (position, plan) in plans.iter().enumerate() {
            if let Plan::New(index) = plan {
                let (network, len) = items[position];
                if u32::from(len) > self.bits {
                    long_positions.push(position);
                    long_keys.push(LongKey4 {
                        prefix_len: u32::from(len),
                        network,
                    });
                    long_values.push(*index);
                }
            }
        }
        // New rules have no long entry yet (`repair` made the map exact).
        let (written, long_error) = self.long.insert_new_batch(&long_keys, &long_values);
        if written < long_keys.len() {
            stop = stop.min(long_positions[written]);
            error = long_error.or_else(|| Some(io::Error::other("long-prefix batch stopped")));
        }

        for (position, plan) in plans.iter().enumerate() {
            let (network, len) = items[position];
            match *plan {
                Plan::New(index) if position >= stop => self.release(index),
                Plan::Known(_) if position >= stop => {}
                Plan::New(index) => {
                    let parent = self.cover(network, len);
                    self.set_parent(index, parent);
                    self.link(index);
                    self.by_key.insert(key(network, len), index);
                }
                Plan::Known(index) => {
                    let mut value = values[position];
                    value.prefix_len = u32::from(len);
                    self.write_value(index, &value);
                }
            }
        }
        (stop, error)
    }

    /// [`RuleMap::update_batch`] of IPv4 prefixes; a prefix of the other
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
                Err(e) => {
                    let (written, error) = self.write_many_as(&items, values, fresh);
                    return (written, error.or(Some(io_of(e))));
                }
            }
        }
        self.write_many_as(&items, values, fresh)
    }

    /// Every rule with its value.
    pub fn rules(&self) -> Vec<(Ipv4Net, RuleValue)> {
        let mut out = Vec::with_capacity(self.by_key.len());
        for (index, node) in self.nodes.iter().enumerate() {
            if node.len == FREE {
                continue;
            }
            if let Ok(net) = Ipv4Net::new(Ipv4Addr::from(node.network), node.len) {
                out.push((net, self.rules.read(index).value));
            }
        }
        out
    }
}

impl<L: Table<LongKey4, u32>> RuleMap for Prefix4Index<L> {
    fn get(&self, prefix: &IpNet) -> Result<Option<RuleValue>, MapError> {
        let (network, len) = parts(prefix)?;
        Ok(self.value(network, len))
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
            .rules()
            .into_iter()
            .map(|(net, value)| (IpNet::V4(net), value))
            .collect())
    }

    fn capacity(&self) -> u32 {
        Prefix4Index::capacity(self)
    }

    fn describe(&self, meta: &mut Meta, list: usize) {
        if let Some(m) = meta.v4.get_mut(list) {
            m.direct_bits = self.bits;
        }
    }
}

#[cfg(test)]
mod tests;
