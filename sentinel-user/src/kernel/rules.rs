//! The allowlist and denylist LPM tries, as userspace sees them.
//!
//! Only the daemon writes these maps, so it keeps two things beside them
//! that the kernel cannot give cheaply: the set of prefixes present in each
//! (exact counts, and knowing whether an import creates or replaces without
//! a syscall per prefix), and an index of entries by expiry time, so that
//! reaping costs the number of expired entries rather than a walk over a
//! million.

use std::{
    collections::{BTreeSet, HashSet},
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::Duration,
};

use aya::{
    Pod,
    maps::{IterableMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sentinel_common::{REASON_LEN, RuleValue, SOURCE_LEN};

use super::{KernelError, clock};
use crate::net::RuleList;

/// One of the four tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Slot {
    AllowV4 = 0,
    AllowV6 = 1,
    DenyV4 = 2,
    DenyV6 = 3,
}

impl Slot {
    const ALL: [Slot; 4] = [Slot::AllowV4, Slot::AllowV6, Slot::DenyV4, Slot::DenyV6];

    fn of(list: RuleList, prefix: &IpNet) -> Slot {
        match (list, prefix) {
            (RuleList::Allow, IpNet::V4(_)) => Slot::AllowV4,
            (RuleList::Allow, IpNet::V6(_)) => Slot::AllowV6,
            (RuleList::Deny, IpNet::V4(_)) => Slot::DenyV4,
            (RuleList::Deny, IpNet::V6(_)) => Slot::DenyV6,
        }
    }

    fn list(self) -> RuleList {
        match self {
            Slot::AllowV4 | Slot::AllowV6 => RuleList::Allow,
            Slot::DenyV4 | Slot::DenyV6 => RuleList::Deny,
        }
    }

    /// The configuration option that sets this trie's capacity.
    fn capacity_option(self) -> &'static str {
        match self {
            Slot::AllowV4 => "allowlist-v4",
            Slot::AllowV6 => "allowlist-v6",
            Slot::DenyV4 => "denylist-v4",
            Slot::DenyV6 => "denylist-v6",
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
    fn value(&self, prefix_len: u8, now_boot_ns: u64) -> RuleValue {
        let mut value = RuleValue::zeroed();
        value.expires_at_ns = self.ttl.map_or(0, |ttl| {
            now_boot_ns
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

const _: () = assert!(SOURCE_LEN > 0 && REASON_LEN > 0);

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

type Trie<K> = LpmTrie<MapData, K, RuleValue>;

/// The four tries with their counts and expiry index.
pub struct RuleTables {
    allow_v4: Trie<[u8; 4]>,
    allow_v6: Trie<[u8; 16]>,
    deny_v4: Trie<[u8; 4]>,
    deny_v6: Trie<[u8; 16]>,
    capacity: [u32; 4],
    /// Prefixes present in each trie.
    present: [HashSet<IpNet>; 4],
    /// (expires_at_ns, slot, prefix) for every entry with a TTL.
    expiry: BTreeSet<(u64, Slot, IpNet)>,
}

fn key_v4(prefix: &IpNet) -> Key<[u8; 4]> {
    match prefix {
        IpNet::V4(net) => Key::new(u32::from(net.prefix_len()), net.addr().octets()),
        // Unreachable: the slot is chosen from the prefix's family.
        IpNet::V6(_) => Key::new(0, [0; 4]),
    }
}

fn key_v6(prefix: &IpNet) -> Key<[u8; 16]> {
    match prefix {
        IpNet::V6(net) => Key::new(u32::from(net.prefix_len()), net.addr().octets()),
        IpNet::V4(_) => Key::new(0, [0; 16]),
    }
}

fn prefix_v4(key: &Key<[u8; 4]>) -> Option<IpNet> {
    Ipv4Net::new(key.data().into(), key.prefix_len() as u8)
        .ok()
        .map(IpNet::V4)
}

fn prefix_v6(key: &Key<[u8; 16]>) -> Option<IpNet> {
    Ipv6Net::new(key.data().into(), key.prefix_len() as u8)
        .ok()
        .map(IpNet::V6)
}

/// Runs `$body` with `$map` bound to the trie of `$slot`, `$key` to the
/// function that turns a prefix into its key, and `$prefix` to the inverse.
macro_rules! with_trie {
    ($tables:expr, $slot:expr, |$map:ident, $key:ident, $prefix:ident| $body:expr) => {
        match $slot {
            Slot::AllowV4 => {
                let ($map, $key, $prefix) = (&mut $tables.allow_v4, key_v4, prefix_v4);
                $body
            }
            Slot::AllowV6 => {
                let ($map, $key, $prefix) = (&mut $tables.allow_v6, key_v6, prefix_v6);
                $body
            }
            Slot::DenyV4 => {
                let ($map, $key, $prefix) = (&mut $tables.deny_v4, key_v4, prefix_v4);
                $body
            }
            Slot::DenyV6 => {
                let ($map, $key, $prefix) = (&mut $tables.deny_v6, key_v6, prefix_v6);
                $body
            }
        }
    };
}

fn is_errno(error: &MapError, errno: i32) -> bool {
    match error {
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(errno),
        _ => false,
    }
}

/// The entry stored under exactly `key`, if any. An LPM lookup returns the
/// longest prefix containing the key among prefixes no longer than the
/// key's; it is the entry itself exactly when the lengths agree.
fn exact<K: Pod>(map: &Trie<K>, key: &Key<K>) -> Result<Option<RuleValue>, MapError> {
    match map.get(key, 0) {
        Ok(value) if value.prefix_len == key.prefix_len() => Ok(Some(value)),
        Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
        Err(error) => Err(error),
    }
}

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6+). Returns how many elements were
/// written before the first failure, and that failure.
///
/// The kernel accepts no flag but `BPF_F_LOCK` per element here (so no
/// `BPF_NOEXIST`), and on an early error (`EINVAL`, `ENOTSUPP`) it does not
/// write `count` back: those mean nothing was written.
fn update_batch<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, Option<io::Error>) {
    // `struct { ... } batch` of `union bpf_attr`, include/uapi/linux/bpf.h.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    debug_assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` points at `count` contiguous keys and values that
    // outlive the call; the kernel reads them and writes back `count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc == 0 {
        return (keys.len(), None);
    }
    let error = io::Error::last_os_error();
    let written = if batch_unsupported(&error) {
        0
    } else {
        attr.count as usize
    };
    (written.min(keys.len()), Some(error))
}

/// Whether the kernel lacks batch operations for this map type.
fn batch_unsupported(error: &io::Error) -> bool {
    // ENOTSUPP (524) is the kernel-internal code the bpf syscall returns
    // when a map type has no batch ops.
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524)
    )
}

const BPF_NOEXIST: u64 = 1;
/// Elements per batch syscall: bounds the copy of values in flight.
const BATCH: usize = 8192;

impl RuleTables {
    pub(super) fn new(
        allow_v4: Trie<[u8; 4]>,
        allow_v6: Trie<[u8; 16]>,
        deny_v4: Trie<[u8; 4]>,
        deny_v6: Trie<[u8; 16]>,
    ) -> Result<Self, KernelError> {
        let capacity = [
            allow_v4.map().info().map(|i| i.max_entries()).unwrap_or(0),
            allow_v6.map().info().map(|i| i.max_entries()).unwrap_or(0),
            deny_v4.map().info().map(|i| i.max_entries()).unwrap_or(0),
            deny_v6.map().info().map(|i| i.max_entries()).unwrap_or(0),
        ];
        let mut tables = Self {
            allow_v4,
            allow_v6,
            deny_v4,
            deny_v6,
            capacity,
            present: Default::default(),
            expiry: BTreeSet::new(),
        };
        tables.rescan()?;
        Ok(tables)
    }

    /// Rebuilds the prefix sets and the expiry index from the maps (at
    /// start, when the maps may hold entries from an earlier run).
    fn rescan(&mut self) -> Result<(), KernelError> {
        self.expiry.clear();
        for slot in Slot::ALL {
            let mut present = HashSet::new();
            let mut expiring = Vec::new();
            with_trie!(self, slot, |map, _key, prefix| {
                for item in map.iter() {
                    let (key, value) = item.map_err(|source| KernelError::Map {
                        op: "read",
                        list: slot.list(),
                        source,
                    })?;
                    let Some(p) = prefix(&key) else { continue };
                    present.insert(p);
                    if value.expires_at_ns != 0 {
                        expiring.push((value.expires_at_ns, slot, p));
                    }
                }
            });
            self.present[slot as usize] = present;
            self.expiry.extend(expiring);
        }
        Ok(())
    }

    /// Entries in `list`, both families.
    pub fn count(&self, list: RuleList) -> usize {
        let (v4, v6) = match list {
            RuleList::Allow => (Slot::AllowV4, Slot::AllowV6),
            RuleList::Deny => (Slot::DenyV4, Slot::DenyV6),
        };
        self.present[v4 as usize].len() + self.present[v6 as usize].len()
    }

    fn full(&self, slot: Slot) -> KernelError {
        KernelError::Full {
            list: slot.list(),
            capacity: self.capacity[slot as usize],
            option: slot.capacity_option(),
        }
    }

    /// The entry stored under exactly `prefix`.
    pub fn get(
        &mut self,
        list: RuleList,
        prefix: &IpNet,
    ) -> Result<Option<RuleValue>, KernelError> {
        let slot = Slot::of(list, prefix);
        with_trie!(self, slot, |map, key, _prefix| exact(map, &key(prefix))).map_err(|source| {
            KernelError::Map {
                op: "read",
                list,
                source,
            }
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
        let now = clock::boottime_ns();
        let mut value = rule.value(prefix.prefix_len(), now);
        let map_err = |source| KernelError::Map {
            op: "write",
            list,
            source,
        };
        let previous = if self.present[slot as usize].contains(prefix) {
            with_trie!(self, slot, |map, key, _prefix| exact(map, &key(prefix))).map_err(map_err)?
        } else {
            None
        };
        if let Some(old) = &previous {
            value.hits = old.hits;
            value.last_hit_ns = old.last_hit_ns;
        }
        let flags = if previous.is_some() { 0 } else { BPF_NOEXIST };
        let written = with_trie!(self, slot, |map, key, _prefix| map.insert(
            &key(prefix),
            value,
            flags
        ));
        match written {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ENOSPC) => return Err(self.full(slot)),
            Err(e) => return Err(map_err(e)),
        }
        if let Some(old) = &previous {
            self.expiry.remove(&(old.expires_at_ns, slot, *prefix));
        }
        self.present[slot as usize].insert(*prefix);
        if value.expires_at_ns != 0 {
            self.expiry.insert((value.expires_at_ns, slot, *prefix));
        }
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
        let Some(old) = with_trie!(self, slot, |map, key, _prefix| exact(map, &key(prefix)))
            .map_err(map_err)?
        else {
            return Ok(false);
        };
        match with_trie!(self, slot, |map, key, _prefix| map.remove(&key(prefix))) {
            Ok(()) => {}
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) if is_errno(&e, libc::ENOENT) => return Ok(false),
            Err(e) => return Err(map_err(e)),
        }
        self.present[slot as usize].remove(prefix);
        self.expiry.remove(&(old.expires_at_ns, slot, *prefix));
        Ok(true)
    }

    /// Every entry of `list`, IPv4 first.
    pub fn entries(&self, list: RuleList) -> Result<Vec<(IpNet, RuleValue)>, KernelError> {
        let map_err = |source| KernelError::Map {
            op: "read",
            list,
            source,
        };
        let mut out = Vec::with_capacity(self.count(list));
        let (v4, v6) = match list {
            RuleList::Allow => (&self.allow_v4, &self.allow_v6),
            RuleList::Deny => (&self.deny_v4, &self.deny_v6),
        };
        for item in v4.iter() {
            let (key, value) = item.map_err(map_err)?;
            out.extend(prefix_v4(&key).map(|p| (p, value)));
        }
        for item in v6.iter() {
            let (key, value) = item.map_err(map_err)?;
            out.extend(prefix_v6(&key).map(|p| (p, value)));
        }
        Ok(out)
    }

    /// Writes many prefixes with batched map updates, falling back to one
    /// update per prefix where the kernel has no batch support. Prefixes
    /// already present are replaced one by one, keeping their hit counts.
    pub fn import(&mut self, list: RuleList, prefixes: &[IpNet], rule: &NewRule) -> Imported {
        let mut out = Imported::default();
        let now = clock::boottime_ns();
        let expires = rule.value(0, now).expires_at_ns;
        let mut seen = HashSet::with_capacity(prefixes.len());
        let mut existing = Vec::new();
        for slot in [
            Slot::of(list, &IpNet::V4(Default::default())),
            Slot::of(list, &IpNet::V6(Default::default())),
        ] {
            let fresh: Vec<IpNet> = prefixes
                .iter()
                .filter(|p| Slot::of(list, p) == slot && seen.insert(**p))
                .filter(|p| {
                    let known = self.present[slot as usize].contains(*p);
                    if known {
                        existing.push(**p);
                    }
                    !known
                })
                .copied()
                .collect();
            let (written, stop) = with_trie!(self, slot, |map, key, _prefix| {
                write_new(map, key, &fresh, rule, now)
            });
            out.created += written;
            self.present[slot as usize].extend(fresh[..written].iter().copied());
            if expires != 0 {
                self.expiry
                    .extend(fresh[..written].iter().map(|p| (expires, slot, *p)));
            }
            if let Some(stop) = stop {
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
        for prefix in existing {
            match self.upsert(list, &prefix, rule) {
                Ok(Upsert::Created) => out.created += 1,
                Ok(Upsert::Replaced) => out.replaced += 1,
                Err(e) => {
                    out.stopped = Some(e);
                    return out;
                }
            }
        }
        out
    }

    /// Removes entries whose TTL has passed; returns them.
    pub fn reap(&mut self, now_boot_ns: u64) -> Result<Vec<(RuleList, IpNet)>, KernelError> {
        let mut reaped = Vec::new();
        while let Some(&(expires, slot, prefix)) = self.expiry.first() {
            if expires > now_boot_ns {
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

/// Writes prefixes known to be absent, in batches. Returns how many were
/// written (a prefix of `prefixes`) and why it stopped early, if it did.
fn write_new<K: Pod>(
    map: &mut Trie<K>,
    key_of: fn(&IpNet) -> Key<K>,
    prefixes: &[IpNet],
    rule: &NewRule,
    now: u64,
) -> (usize, Option<BatchStop>) {
    let template = rule.value(0, now);
    let mut written = 0;
    let mut batch_ok = true;
    for chunk in prefixes.chunks(BATCH) {
        let keys: Vec<Key<K>> = chunk.iter().map(key_of).collect();
        let values: Vec<RuleValue> = chunk
            .iter()
            .map(|p| {
                let mut value = template;
                value.prefix_len = u32::from(p.prefix_len());
                value
            })
            .collect();
        if batch_ok {
            let (done, error) = update_batch(map.map().fd().as_fd(), &keys, &values);
            written += done;
            match error {
                None => continue,
                Some(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    return (written, Some(BatchStop::Full));
                }
                Some(e) if done == 0 && batch_unsupported(&e) => {
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
        for (key, value) in keys.iter().zip(&values) {
            match map.insert(key, value, 0) {
                Ok(()) => written += 1,
                Err(e) if is_errno(&e, libc::ENOSPC) => return (written, Some(BatchStop::Full)),
                Err(e) => return (written, Some(BatchStop::Error(e))),
            }
        }
    }
    (written, None)
}
