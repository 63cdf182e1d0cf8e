//! The allowlist and denylist, as userspace sees them: for each list and
//! address family, a hash map of hosts (/32, /128) and a prefix index of
//! shorter prefixes ([`super::prefix4`], [`super::prefix6`]).
//!
//! Only the daemon writes these maps, so it keeps beside them what the
//! kernel cannot give cheaply: the set of prefixes present in each map
//! (exact counts, whether an import creates or replaces, which maps are
//! empty so that the program can skip them) and an index of entries by
//! expiry time (reaping costs the entries that expired, not a walk over a
//! million). It also writes the program's metadata (`SENTINEL_META`):
//! which maps are empty and the shape of each prefix index.

use std::{collections::BTreeSet, time::Duration};

use aya::maps::{Array, MapData, MapError};
use ipnet::IpNet;
use sentinel_common::{LAYOUT_VERSION, Meta, RuleValue, maps, populated, prefix};

use super::{KernelError, clock, rule_maps::RuleMap};
use crate::net::RuleList;

/// Sets of up to millions of prefixes are built on every start and import:
/// foldhash is several times faster than SipHash here and still seeded at
/// random per process.
type PrefixSet = std::collections::HashSet<IpNet, foldhash::fast::RandomState>;

/// One of the eight stores: a prefix index or a host map per list and
/// family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Slot {
    AllowV4 = 0,
    AllowV6 = 1,
    AllowHostV4 = 2,
    AllowHostV6 = 3,
    DenyV4 = 4,
    DenyV6 = 5,
    DenyHostV4 = 6,
    DenyHostV6 = 7,
}

impl Slot {
    pub(super) const ALL: [Slot; 8] = [
        Slot::AllowV4,
        Slot::AllowV6,
        Slot::AllowHostV4,
        Slot::AllowHostV6,
        Slot::DenyV4,
        Slot::DenyV6,
        Slot::DenyHostV4,
        Slot::DenyHostV6,
    ];

    fn of(list: RuleList, prefix: &IpNet) -> Slot {
        let host = prefix.prefix_len() == prefix.max_prefix_len();
        match (list, prefix, host) {
            (RuleList::Allow, IpNet::V4(_), false) => Slot::AllowV4,
            (RuleList::Allow, IpNet::V6(_), false) => Slot::AllowV6,
            (RuleList::Allow, IpNet::V4(_), true) => Slot::AllowHostV4,
            (RuleList::Allow, IpNet::V6(_), true) => Slot::AllowHostV6,
            (RuleList::Deny, IpNet::V4(_), false) => Slot::DenyV4,
            (RuleList::Deny, IpNet::V6(_), false) => Slot::DenyV6,
            (RuleList::Deny, IpNet::V4(_), true) => Slot::DenyHostV4,
            (RuleList::Deny, IpNet::V6(_), true) => Slot::DenyHostV6,
        }
    }

    fn list(self) -> RuleList {
        if (self as usize) < 4 {
            RuleList::Allow
        } else {
            RuleList::Deny
        }
    }

    /// The list's position in the program's metadata.
    fn list_index(self) -> usize {
        match self.list() {
            RuleList::Allow => prefix::list::ALLOW,
            RuleList::Deny => prefix::list::DENY,
        }
    }

    /// For a host map whose lookups a prefix index gates (IPv6: the filter's
    /// host bit), that index.
    fn host_gate(self) -> Option<Slot> {
        match self {
            Slot::AllowHostV6 => Some(Slot::AllowV6),
            Slot::DenyHostV6 => Some(Slot::DenyV6),
            _ => None,
        }
    }

    /// The bit of `Meta::populated` for this map.
    fn bit(self) -> u32 {
        match self {
            Slot::AllowV4 => populated::ALLOW_V4,
            Slot::AllowV6 => populated::ALLOW_V6,
            Slot::AllowHostV4 => populated::ALLOW_HOST_V4,
            Slot::AllowHostV6 => populated::ALLOW_HOST_V6,
            Slot::DenyV4 => populated::DENY_V4,
            Slot::DenyV6 => populated::DENY_V6,
            Slot::DenyHostV4 => populated::DENY_HOST_V4,
            Slot::DenyHostV6 => populated::DENY_HOST_V6,
        }
    }

    /// The configuration option that sets this map's capacity.
    fn capacity_option(self) -> &'static str {
        match self {
            Slot::AllowV4 | Slot::AllowHostV4 => "allowlist-v4",
            Slot::AllowV6 | Slot::AllowHostV6 => "allowlist-v6",
            Slot::DenyV4 | Slot::DenyHostV4 => "denylist-v4",
            Slot::DenyV6 | Slot::DenyHostV6 => "denylist-v6",
        }
    }
}

/// What to write for a new or replaced entry.
#[derive(Debug, Clone)]
pub struct NewRule {
    /// `None`: never expires.
    pub ttl: Option<Duration>,
    pub source: String,
    pub reason: String,
}

impl NewRule {
    pub(crate) fn value(&self, prefix_len: u8, now_ns: u64) -> RuleValue {
        let mut value = RuleValue::zeroed();
        value.expires_at_ns = self.ttl.map_or(0, |ttl| {
            now_ns
                .saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
                .max(1)
        });
        value.created_at_unix_s = clock::unix_seconds();
        value.prefix_len = u32::from(prefix_len);
        copy_text(&mut value.source, &self.source);
        copy_text(&mut value.reason, &self.reason);
        value
    }
}

/// Copies `text` into a NUL-padded field, cut on a UTF-8 boundary.
fn copy_text<const N: usize>(field: &mut [u8; N], text: &str) {
    let mut end = text.len().min(N);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    field[..end].copy_from_slice(&text.as_bytes()[..end]);
}

/// Reads a NUL-padded text field.
pub fn text(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Whether an upsert created an entry or replaced one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Created,
    Replaced,
}

/// The result of a bulk import.
#[derive(Debug, Default)]
pub struct Imported {
    pub created: usize,
    pub replaced: usize,
    /// Set when the import stopped early (a full map); entries before it
    /// were written.
    pub stopped: Option<KernelError>,
}

/// Elements per batch syscall: bounds the copy of values in flight.
const BATCH: usize = 8192;

/// Elements per chunk of new entries: enough for several threads to write
/// side by side, with 9 MB of values in flight.
const FRESH_CHUNK: usize = 8 * BATCH;

fn is_errno(error: &MapError, errno: i32) -> bool {
    match error {
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(errno),
        _ => false,
    }
}

/// The eight stores with their prefix sets and expiry index.
pub struct RuleTables {
    maps: [Box<dyn RuleMap>; 8],
    meta: Array<MapData, Meta>,
    /// `Meta` as last written.
    written: Option<Meta>,
    /// Prefixes present in each map, by slot.
    present: [PrefixSet; 8],
    /// (expires_at_ns, slot, prefix) for every entry with a TTL.
    expiry: BTreeSet<(u64, Slot, IpNet)>,
}

impl RuleTables {
    /// Takes the maps in [`Slot::ALL`] order and rebuilds the bookkeeping
    /// from what they hold (entries from an earlier run included).
    pub(super) fn new(
        maps: [Box<dyn RuleMap>; 8],
        meta: Array<MapData, Meta>,
    ) -> Result<Self, KernelError> {
        let mut tables = Self {
            maps,
            meta,
            // Unknown until written: force the first write.
            written: None,
            present: Default::default(),
            expiry: BTreeSet::new(),
        };
        let mut hosts: [Vec<IpNet>; 8] = Default::default();
        for slot in Slot::ALL {
            let entries = tables.maps[slot as usize]
                .dump()
                .map_err(|source| KernelError::Map {
                    op: "read",
                    list: slot.list(),
                    source,
                })?;
            for (prefix, value) in entries {
                if value.expires_at_ns != 0 {
                    tables.expiry.insert((value.expires_at_ns, slot, prefix));
                }
                tables.present[slot as usize].insert(prefix);
                if slot.host_gate().is_some() {
                    hosts[slot as usize].push(prefix);
                }
            }
        }
        for slot in Slot::ALL {
            if let Some(gate) = slot.host_gate() {
                tables.maps[gate as usize]
                    .restore_hosts(&hosts[slot as usize])
                    .map_err(|source| KernelError::Map {
                        op: "rebuild",
                        list: slot.list(),
                        source,
                    })?;
            }
        }
        tables.sync_populated()?;
        Ok(tables)
    }

    /// Writes `Meta` when it changed: which maps are non-empty, and each
    /// prefix index's shape. Called after writes (so the program looks once
    /// entries exist) and after removals, before the caller is answered.
    fn sync_populated(&mut self) -> Result<(), KernelError> {
        let populated = Slot::ALL
            .iter()
            .filter(|s| !self.present[**s as usize].is_empty())
            .fold(0, |bits, s| bits | s.bit());
        let mut meta = Meta {
            layout_version: LAYOUT_VERSION,
            populated,
            ..Meta::default()
        };
        for slot in Slot::ALL {
            self.maps[slot as usize].describe(&mut meta, slot.list_index());
        }
        if self.written == Some(meta) {
            return Ok(());
        }
        self.meta
            .set(0, meta, 0)
            .map_err(|source| KernelError::OtherMap {
                name: maps::META,
                source,
            })?;
        self.written = Some(meta);
        Ok(())
    }

    /// Tells the prefix index that gates `slot`'s host lookups, if any,
    /// about hosts added or removed.
    fn gate_hosts(
        &mut self,
        slot: Slot,
        hosts: &[IpNet],
        present: bool,
    ) -> Result<(), KernelError> {
        match slot.host_gate() {
            Some(gate) => self.maps[gate as usize]
                .hosts_changed(hosts, present)
                .map_err(|source| KernelError::Map {
                    op: "write",
                    list: slot.list(),
                    source,
                }),
            None => Ok(()),
        }
    }

    /// Entries in `list`, hosts and prefixes of both families.
    pub fn count(&self, list: RuleList) -> usize {
        Slot::ALL
            .iter()
            .filter(|s| s.list() == list)
            .map(|s| self.present[*s as usize].len())
            .sum()
    }

    fn full(&self, slot: Slot) -> KernelError {
        KernelError::Full {
            list: slot.list(),
            capacity: self.maps[slot as usize].capacity(),
            option: slot.capacity_option(),
        }
    }

    /// The entry stored under exactly `prefix`.
    pub fn get(&self, list: RuleList, prefix: &IpNet) -> Result<Option<RuleValue>, KernelError> {
        let slot = Slot::of(list, prefix);
        if !self.present[slot as usize].contains(prefix) {
            return Ok(None);
        }
        self.maps[slot as usize]
            .get(prefix)
            .map_err(|source| KernelError::Map {
                op: "read",
                list,
                source,
            })
    }

    /// Adds `prefix` or replaces its entry. A replaced entry keeps its hit
    /// count and last-hit time: re-adding a prefix (to extend a ban, say)
    /// does not erase its history.
    pub fn upsert(
        &mut self,
        list: RuleList,
        prefix: &IpNet,
        rule: &NewRule,
    ) -> Result<Upsert, KernelError> {
        let slot = Slot::of(list, prefix);
        let map_err = |source| KernelError::Map {
            op: "write",
            list,
            source,
        };
        let mut value = rule.value(prefix.prefix_len(), clock::now_ns());
        let previous = self.get(list, prefix)?;
        if let Some(old) = &previous {
            value.hits = old.hits;
            value.last_hit_ns = old.last_hit_ns;
        }
        match self.maps[slot as usize].insert(prefix, &value) {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ENOSPC) || is_errno(&e, libc::E2BIG) => {
                return Err(self.full(slot));
            }
            Err(e) => return Err(map_err(e)),
        }
        if let Some(old) = &previous {
            self.expiry.remove(&(old.expires_at_ns, slot, *prefix));
        }
        if value.expires_at_ns != 0 {
            self.expiry.insert((value.expires_at_ns, slot, *prefix));
        }
        if self.present[slot as usize].insert(*prefix) {
            self.gate_hosts(slot, std::slice::from_ref(prefix), true)?;
        }
        self.sync_populated()?;
        Ok(if previous.is_some() {
            Upsert::Replaced
        } else {
            Upsert::Created
        })
    }

    /// Removes exactly `prefix`; `false` when it was not there.
    pub fn remove(&mut self, list: RuleList, prefix: &IpNet) -> Result<bool, KernelError> {
        let slot = Slot::of(list, prefix);
        let map_err = |source| KernelError::Map {
            op: "delete",
            list,
            source,
        };
        let Some(old) = self.get(list, prefix)? else {
            return Ok(false);
        };
        match self.maps[slot as usize].remove(prefix) {
            Ok(()) => {}
            Err(MapError::KeyNotFound) => {}
            Err(e) if is_errno(&e, libc::ENOENT) => {}
            Err(e) => return Err(map_err(e)),
        }
        if self.present[slot as usize].remove(prefix) {
            self.gate_hosts(slot, std::slice::from_ref(prefix), false)?;
        }
        self.expiry.remove(&(old.expires_at_ns, slot, *prefix));
        self.sync_populated()?;
        Ok(true)
    }

    /// Every entry of `list`: IPv4 before IPv6, each family's prefixes
    /// before its hosts.
    pub fn entries(&self, list: RuleList) -> Result<Vec<(IpNet, RuleValue)>, KernelError> {
        let mut out = Vec::with_capacity(self.count(list));
        let order = match list {
            RuleList::Allow => [
                Slot::AllowV4,
                Slot::AllowHostV4,
                Slot::AllowV6,
                Slot::AllowHostV6,
            ],
            RuleList::Deny => [
                Slot::DenyV4,
                Slot::DenyHostV4,
                Slot::DenyV6,
                Slot::DenyHostV6,
            ],
        };
        for slot in order {
            let entries = self.maps[slot as usize]
                .dump()
                .map_err(|source| KernelError::Map {
                    op: "read",
                    list,
                    source,
                })?;
            out.extend(entries);
        }
        Ok(out)
    }

    /// Writes many prefixes with batched map updates, falling back to one
    /// update per prefix where the kernel has no batch support. Prefixes
    /// already present are replaced one by one, keeping their hit counts.
    pub fn import(&mut self, list: RuleList, prefixes: &[IpNet], rule: &NewRule) -> Imported {
        let mut out = Imported::default();
        let now = clock::now_ns();
        let template = rule.value(0, now);
        // New prefixes are marked present right away (which also spots
        // duplicates within the input); whatever is not written below is
        // unmarked again.
        let mut fresh: [Vec<IpNet>; 8] = Default::default();
        let mut existing = Vec::new();
        // Sized once: growing sets of a million prefixes rehashes them
        // again and again.
        let mut per_slot = [0usize; 8];
        for prefix in prefixes {
            per_slot[Slot::of(list, prefix) as usize] += 1;
        }
        for slot in Slot::ALL {
            self.present[slot as usize].reserve(per_slot[slot as usize]);
            fresh[slot as usize].reserve(per_slot[slot as usize]);
        }
        for prefix in prefixes {
            let slot = Slot::of(list, prefix);
            if self.present[slot as usize].insert(*prefix) {
                fresh[slot as usize].push(*prefix);
            } else {
                existing.push(*prefix);
            }
        }
        for slot in Slot::ALL {
            let new = &fresh[slot as usize];
            if new.is_empty() {
                continue;
            }
            let (written, stop) = write_all(self.maps[slot as usize].as_mut(), new, true, |p| {
                let mut value = template;
                value.prefix_len = u32::from(p.prefix_len());
                value
            });
            out.created += written;
            if let Err(e) = self.gate_hosts(slot, &new[..written], true) {
                out.stopped = Some(e);
                return out;
            }
            if template.expires_at_ns != 0 {
                self.expiry.extend(
                    new[..written]
                        .iter()
                        .map(|p| (template.expires_at_ns, slot, *p)),
                );
            }
            if let Some(stop) = stop {
                for later in Slot::ALL.iter().filter(|s| **s >= slot) {
                    let unwritten = if *later == slot { written } else { 0 };
                    for prefix in &fresh[*later as usize][unwritten..] {
                        self.present[*later as usize].remove(prefix);
                    }
                }
                // What was written must still be looked up.
                let _ = self.sync_populated();
                out.stopped = Some(match stop {
                    BatchStop::Full => self.full(slot),
                    BatchStop::Error(source) => KernelError::Map {
                        op: "write",
                        list,
                        source,
                    },
                });
                return out;
            }
        }
        if let Err(e) = self.sync_populated() {
            out.stopped = Some(e);
            return out;
        }
        let mut known: [Vec<IpNet>; 8] = Default::default();
        for prefix in existing {
            known[Slot::of(list, &prefix) as usize].push(prefix);
        }
        for slot in Slot::ALL {
            let replaced = match self.replace_many(slot, &known[slot as usize], &template) {
                Ok(n) => n,
                Err(e) => {
                    out.stopped = Some(e);
                    return out;
                }
            };
            out.replaced += replaced;
        }
        out
    }

    /// Replaces entries known to be present with `template`, keeping each
    /// one's hit count and last-hit time. Many at once are read back with
    /// one batched dump of the map and written with batched updates; a few
    /// are replaced one by one.
    fn replace_many(
        &mut self,
        slot: Slot,
        prefixes: &[IpNet],
        template: &RuleValue,
    ) -> Result<usize, KernelError> {
        // Dumping reads the whole map: worth it when the request replaces a
        // good part of it, not for each chunk of a large import.
        let dump_from = (self.present[slot as usize].len() / 8).max(256);
        let list = slot.list();
        if prefixes.len() < dump_from {
            let rule_of = |old: Option<RuleValue>, p: &IpNet| {
                let mut value = *template;
                value.prefix_len = u32::from(p.prefix_len());
                if let Some(old) = old {
                    value.hits = old.hits;
                    value.last_hit_ns = old.last_hit_ns;
                }
                value
            };
            for prefix in prefixes {
                let old = self.get(list, prefix)?;
                let value = rule_of(old, prefix);
                self.maps[slot as usize]
                    .insert(prefix, &value)
                    .map_err(|e| {
                        if is_errno(&e, libc::ENOSPC) || is_errno(&e, libc::E2BIG) {
                            self.full(slot)
                        } else {
                            KernelError::Map {
                                op: "write",
                                list,
                                source: e,
                            }
                        }
                    })?;
                self.reindex(
                    slot,
                    prefix,
                    old.map(|o| o.expires_at_ns),
                    value.expires_at_ns,
                );
            }
            return Ok(prefixes.len());
        }
        let current: std::collections::HashMap<IpNet, RuleValue, foldhash::fast::RandomState> =
            self.maps[slot as usize]
                .dump()
                .map_err(|source| KernelError::Map {
                    op: "read",
                    list,
                    source,
                })?
                .into_iter()
                .collect();
        let (written, stop) = write_all(self.maps[slot as usize].as_mut(), prefixes, false, |p| {
            let mut value = *template;
            value.prefix_len = u32::from(p.prefix_len());
            if let Some(old) = current.get(p) {
                value.hits = old.hits;
                value.last_hit_ns = old.last_hit_ns;
            }
            value
        });
        for prefix in &prefixes[..written] {
            let old = current.get(prefix).map(|o| o.expires_at_ns);
            self.reindex(slot, prefix, old, template.expires_at_ns);
        }
        match stop {
            None => Ok(written),
            Some(BatchStop::Full) => Err(self.full(slot)),
            Some(BatchStop::Error(source)) => Err(KernelError::Map {
                op: "write",
                list,
                source,
            }),
        }
    }

    /// Moves `prefix` in the expiry index from `old` to `new` expiry.
    fn reindex(&mut self, slot: Slot, prefix: &IpNet, old: Option<u64>, new: u64) {
        if let Some(old) = old.filter(|o| *o != 0) {
            self.expiry.remove(&(old, slot, *prefix));
        }
        if new != 0 {
            self.expiry.insert((new, slot, *prefix));
        }
    }

    /// Removes entries whose TTL has passed; returns them.
    pub fn reap(&mut self, now_ns: u64) -> Result<Vec<(RuleList, IpNet)>, KernelError> {
        let mut reaped = Vec::new();
        while let Some(&(expires, slot, prefix)) = self.expiry.first() {
            if expires > now_ns {
                break;
            }
            self.expiry.pop_first();
            let list = slot.list();
            // Only delete what is still the expired entry: it may have been
            // replaced with a new TTL since it was indexed.
            let still_expired = self
                .get(list, &prefix)?
                .is_some_and(|value| value.expires_at_ns == expires);
            if still_expired && self.remove(list, &prefix)? {
                reaped.push((list, prefix));
            }
        }
        Ok(reaped)
    }
}

enum BatchStop {
    Full,
    Error(MapError),
}

/// Writes `prefixes`, each with `value(prefix)`, in batches. `fresh`: none
/// of them is in the map, which may then write them on several threads
/// ([`RuleMap::insert_new_batch`]), in larger chunks. Returns how many were
/// written (a prefix of `prefixes`) and why it stopped early, if it did.
fn write_all(
    map: &mut dyn RuleMap,
    prefixes: &[IpNet],
    fresh: bool,
    value: impl Fn(&IpNet) -> RuleValue,
) -> (usize, Option<BatchStop>) {
    let mut written = 0;
    let mut batch_ok = true;
    let chunk_len = if fresh { FRESH_CHUNK } else { BATCH };
    for chunk in prefixes.chunks(chunk_len) {
        let values: Vec<RuleValue> = chunk.iter().map(&value).collect();
        if batch_ok {
            let (done, error) = if fresh {
                map.insert_new_batch(chunk, &values)
            } else {
                map.update_batch(chunk, &values)
            };
            written += done;
            match error {
                None => continue,
                Some(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::E2BIG)) => {
                    return (written, Some(BatchStop::Full));
                }
                Some(e) if done == 0 && super::sys::batch_unsupported(&e) => {
                    tracing::debug!(error = %e, "no batch updates for this map; writing one by one");
                    batch_ok = false;
                }
                Some(e) => {
                    let source = MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_update_batch",
                        io_error: e,
                    });
                    return (written, Some(BatchStop::Error(source)));
                }
            }
        }
        for (prefix, value) in chunk.iter().zip(&values) {
            match map.insert(prefix, value) {
                Ok(()) => written += 1,
                Err(e) if is_errno(&e, libc::ENOSPC) || is_errno(&e, libc::E2BIG) => {
                    return (written, Some(BatchStop::Full));
                }
                Err(e) => return (written, Some(BatchStop::Error(e))),
            }
        }
    }
    (written, None)
}
