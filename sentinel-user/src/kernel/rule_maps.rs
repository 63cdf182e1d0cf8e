//! The two kinds of map an address list is stored in, behind one interface:
//! LPM tries for prefixes and hash maps for hosts (/32, /128).

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sentinel_common::RuleValue;

use super::sys::{self, BatchAttr, batch_unsupported};

/// Operations the rule tables need from one map. Keys are prefixes; each
/// implementation knows its key layout.
pub trait RuleMap: Send {
    /// The entry stored under exactly `prefix`.
    fn get(&self, prefix: &IpNet) -> Result<Option<RuleValue>, MapError>;
    fn insert(&mut self, prefix: &IpNet, value: &RuleValue) -> Result<(), MapError>;
    fn remove(&mut self, prefix: &IpNet) -> Result<(), MapError>;
    fn entries(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError>;
    /// Writes `prefixes[i] -> values[i]` with `BPF_MAP_UPDATE_BATCH`;
    /// returns how many were written and the error that stopped it.
    fn update_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>);
    /// Every entry, read with `BPF_MAP_LOOKUP_BATCH` (thousands per
    /// syscall); falls back to [`RuleMap::entries`] where the kernel has no
    /// batch lookup for the map.
    fn dump(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError>;
    fn capacity(&self) -> u32;
}

/// An LPM trie keyed by `Key<K>`.
pub struct PrefixMap<K: Pod> {
    map: LpmTrie<MapData, K, RuleValue>,
    key: fn(&IpNet) -> K,
    prefix: fn(K, u8) -> Option<IpNet>,
}

/// A hash map keyed by the address itself.
pub struct HostMap<K: Pod> {
    map: HashMap<MapData, K, RuleValue>,
    key: fn(&IpNet) -> K,
    prefix: fn(K, u8) -> Option<IpNet>,
    bits: u8,
}

pub fn v4_key(prefix: &IpNet) -> [u8; 4] {
    match prefix {
        IpNet::V4(net) => net.addr().octets(),
        // Unreachable: maps are chosen from the prefix's family.
        IpNet::V6(_) => [0; 4],
    }
}

pub fn v6_key(prefix: &IpNet) -> [u8; 16] {
    match prefix {
        IpNet::V6(net) => net.addr().octets(),
        IpNet::V4(_) => [0; 16],
    }
}

pub fn v4_prefix(addr: [u8; 4], len: u8) -> Option<IpNet> {
    Ipv4Net::new(addr.into(), len).ok().map(IpNet::V4)
}

pub fn v6_prefix(addr: [u8; 16], len: u8) -> Option<IpNet> {
    Ipv6Net::new(addr.into(), len).ok().map(IpNet::V6)
}

impl<K: Pod> PrefixMap<K> {
    pub fn new(
        map: LpmTrie<MapData, K, RuleValue>,
        key: fn(&IpNet) -> K,
        prefix: fn(K, u8) -> Option<IpNet>,
    ) -> Self {
        Self { map, key, prefix }
    }

    fn key_of(&self, prefix: &IpNet) -> Key<K> {
        Key::new(u32::from(prefix.prefix_len()), (self.key)(prefix))
    }
}

impl<K: Pod> HostMap<K> {
    pub fn new(
        map: HashMap<MapData, K, RuleValue>,
        key: fn(&IpNet) -> K,
        prefix: fn(K, u8) -> Option<IpNet>,
        bits: u8,
    ) -> Self {
        Self {
            map,
            key,
            prefix,
            bits,
        }
    }
}

fn capacity(map: &MapData) -> u32 {
    map.info().map(|i| i.max_entries()).unwrap_or(0)
}

impl<K: Pod + Send> RuleMap for PrefixMap<K> {
    fn get(&self, prefix: &IpNet) -> Result<Option<RuleValue>, MapError> {
        let key = self.key_of(prefix);
        // An LPM lookup returns the longest prefix containing the key among
        // prefixes no longer than the key's: the entry itself exactly when
        // the lengths agree.
        match self.map.get(&key, 0) {
            Ok(value) if value.prefix_len == key.prefix_len() => Ok(Some(value)),
            Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn insert(&mut self, prefix: &IpNet, value: &RuleValue) -> Result<(), MapError> {
        let key = self.key_of(prefix);
        self.map.insert(&key, value, 0)
    }

    fn remove(&mut self, prefix: &IpNet) -> Result<(), MapError> {
        let key = self.key_of(prefix);
        self.map.remove(&key)
    }

    fn entries(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (key, value) = item?;
            out.extend((self.prefix)(key.data(), key.prefix_len() as u8).map(|p| (p, value)));
        }
        Ok(out)
    }

    fn update_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        let keys: Vec<Key<K>> = prefixes.iter().map(|p| self.key_of(p)).collect();
        update_batch(self.map.map().fd().as_fd(), &keys, values)
    }

    fn dump(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError> {
        dump_or(
            self.map.map().fd().as_fd(),
            |k: Key<K>| (self.prefix)(k.data(), k.prefix_len() as u8),
            || self.entries(),
        )
    }

    fn capacity(&self) -> u32 {
        capacity(self.map.map())
    }
}

impl<K: Pod + Send> RuleMap for HostMap<K> {
    fn get(&self, prefix: &IpNet) -> Result<Option<RuleValue>, MapError> {
        match self.map.get(&(self.key)(prefix), 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn insert(&mut self, prefix: &IpNet, value: &RuleValue) -> Result<(), MapError> {
        self.map.insert((self.key)(prefix), value, 0)
    }

    fn remove(&mut self, prefix: &IpNet) -> Result<(), MapError> {
        self.map.remove(&(self.key)(prefix))
    }

    fn entries(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (key, value) = item?;
            out.extend((self.prefix)(key, self.bits).map(|p| (p, value)));
        }
        Ok(out)
    }

    fn update_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        let keys: Vec<K> = prefixes.iter().map(|p| (self.key)(p)).collect();
        update_batch(self.map.map().fd().as_fd(), &keys, values)
    }

    fn dump(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError> {
        dump_or(
            self.map.map().fd().as_fd(),
            |k: K| (self.prefix)(k, self.bits),
            || self.entries(),
        )
    }

    fn capacity(&self) -> u32 {
        capacity(self.map.map())
    }
}

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6+). Returns how many elements were
/// written before the first failure, and that failure.
///
/// The kernel accepts no per-element flag but `BPF_F_LOCK` here (so no
/// `BPF_NOEXIST`), and on an early error (`EINVAL`, `ENOTSUPP`) it does not
/// write `count` back: those mean nothing was written.
fn update_batch<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, Option<io::Error>) {
    let count = keys.len().min(values.len());
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `count` contiguous keys and values that
    // outlive the call; the kernel reads them and writes back `count`.
    match unsafe { sys::bpf(sys::BPF_MAP_UPDATE_BATCH, &mut attr) } {
        Ok(_) => (count, None),
        Err(error) => {
            let written = if batch_unsupported(&error) {
                0
            } else {
                attr.count as usize
            };
            (written.min(count), Some(error))
        }
    }
}

/// Reads every entry with `BPF_MAP_LOOKUP_BATCH`, `LOOKUP_CHUNK` at a time.
///
/// The kernel walks the map from an opaque position it writes to
/// `out_batch` and reads back from `in_batch` (a bucket index for hash
/// maps, a key for the generic walk of other maps; a buffer of the key's
/// size and at least 8 bytes holds either). It answers `ENOENT` once the
/// walk is over, possibly with a last few entries.
fn lookup_all<K: Copy>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, RuleValue)>> {
    const LOOKUP_CHUNK: usize = 4096;
    let token_len = std::mem::size_of::<K>().max(8);
    let mut token_in = vec![0u8; token_len];
    let mut token_out = vec![0u8; token_len];
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(LOOKUP_CHUNK);
    let mut values: Vec<MaybeUninit<RuleValue>> = Vec::with_capacity(LOOKUP_CHUNK);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                token_in.as_mut_ptr() as u64
            },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the key and value buffers have room for `count` elements
        // and the tokens for either kind of position; all outlive the call.
        let done = match unsafe { sys::bpf(sys::BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let got = (attr.count as usize).min(LOOKUP_CHUNK);
        for i in 0..got {
            // SAFETY: the kernel wrote `count` keys and values.
            out.push(unsafe {
                (
                    keys.as_ptr().add(i).read().assume_init(),
                    values.as_ptr().add(i).read().assume_init(),
                )
            });
        }
        if done {
            return Ok(out);
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// Every entry of the map behind `fd` with [`lookup_all`], its keys turned
/// into prefixes by `prefix`; `fallback` where the kernel has no batch
/// lookup for the map.
fn dump_or<K: Copy>(
    fd: BorrowedFd<'_>,
    prefix: impl Fn(K) -> Option<IpNet>,
    fallback: impl FnOnce() -> Result<Vec<(IpNet, RuleValue)>, MapError>,
) -> Result<Vec<(IpNet, RuleValue)>, MapError> {
    match lookup_all::<K>(fd) {
        Ok(entries) => Ok(entries
            .into_iter()
            .filter_map(|(k, v)| prefix(k).map(|p| (p, v)))
            .collect()),
        Err(e) if batch_unsupported(&e) => fallback(),
        Err(io_error) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        })),
    }
}
