//! The three kinds of store an address list is kept in, behind one
//! interface: hash maps for hosts (/32, /128), and a prefix index per
//! family for shorter prefixes ([`super::prefix4`], [`super::prefix6`]).

use std::{io, os::fd::AsFd};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, MapData, MapError},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sentinel_common::{Meta, RuleValue};

use super::{
    sys::batch_unsupported,
    table::{insert_new_batch, lookup_all, update_batch},
};

/// Operations the rule tables need from one store. Keys are prefixes; each
/// implementation knows its key layout.
pub trait RuleMap: Send {
    /// The entry stored under exactly `prefix`.
    fn get(&self, prefix: &IpNet) -> Result<Option<RuleValue>, MapError>;
    /// Adds or replaces the entry of `prefix`; it is in force on return.
    fn insert(&mut self, prefix: &IpNet, value: &RuleValue) -> Result<(), MapError>;
    /// `MapError::KeyNotFound` (or `ENOENT`) when absent.
    fn remove(&mut self, prefix: &IpNet) -> Result<(), MapError>;
    /// Writes `prefixes[i] -> values[i]` in order, batched where possible;
    /// returns how many were written (a prefix of `prefixes`) and the error
    /// that stopped it (`ENOSPC` or `E2BIG` when full).
    fn update_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>);
    /// As [`RuleMap::update_batch`], for prefixes known to be absent from
    /// the store: hash maps write them on several threads
    /// ([`super::table::insert_new_batch`]).
    fn insert_new_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        self.update_batch(prefixes, values)
    }
    /// Every entry, read in bulk (thousands per syscall, or none at all for
    /// stores the daemon reads through mmap).
    fn dump(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError>;
    fn capacity(&self) -> u32;

    /// Writes this store's part of the program's metadata for list `list`
    /// (a position of `sentinel_common::prefix::list`). Only prefix indexes
    /// have one.
    fn describe(&self, _meta: &mut Meta, _list: usize) {}

    /// Hosts of this store's list and family were added (`present`) or
    /// removed. The IPv6 prefix index keeps a bit per filter slot that
    /// gates the program's host lookups; other stores ignore this.
    fn hosts_changed(&mut self, _hosts: &[IpNet], _present: bool) -> Result<(), MapError> {
        Ok(())
    }

    /// Every host of this store's list and family, once at start: the IPv6
    /// prefix index rebuilds its host bits from them.
    fn restore_hosts(&mut self, _hosts: &[IpNet]) -> Result<(), MapError> {
        Ok(())
    }
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

/// The error a store answers for a prefix of the other family (never
/// passed by the rule tables, which pick stores by family).
pub fn wrong_family() -> MapError {
    MapError::SyscallError(aya::sys::SyscallError {
        call: "prefix family",
        io_error: io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
    })
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

    fn entries(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (key, value) = item?;
            out.extend((self.prefix)(key, self.bits).map(|p| (p, value)));
        }
        Ok(out)
    }
}

impl<K: Pod + Send + Sync> RuleMap for HostMap<K> {
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

    fn update_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        let keys: Vec<K> = prefixes.iter().map(|p| (self.key)(p)).collect();
        update_batch(self.map.map().fd().as_fd(), &keys, values)
    }

    fn insert_new_batch(
        &mut self,
        prefixes: &[IpNet],
        values: &[RuleValue],
    ) -> (usize, Option<io::Error>) {
        let keys: Vec<K> = prefixes.iter().map(|p| (self.key)(p)).collect();
        insert_new_batch(self.map.map().fd().as_fd(), &keys, values)
    }

    fn dump(&self) -> Result<Vec<(IpNet, RuleValue)>, MapError> {
        match lookup_all::<K, RuleValue>(self.map.map().fd().as_fd()) {
            Ok(entries) => Ok(entries
                .into_iter()
                .filter_map(|(k, v)| (self.prefix)(k, self.bits).map(|p| (p, v)))
                .collect()),
            Err(e) if batch_unsupported(&e) => self.entries(),
            Err(io_error) => Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error,
            })),
        }
    }

    fn capacity(&self) -> u32 {
        self.map.map().info().map(|i| i.max_entries()).unwrap_or(0)
    }
}
