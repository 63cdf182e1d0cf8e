//! Connection steering from userspace: the `sk_lookup` program's rules,
//! listener sockets and watchlist (`sentinel_common::steer`).
//!
//! The program belongs to the control instance, whose maps these are. It
//! is loaded (verified) the first time steering is configured, at start or
//! at a reload, and attached to the daemon's network namespace only while
//! steering is configured; dropping the link (or the daemon) detaches it,
//! and the kernel's own socket lookup is back exactly as before. A daemon
//! that never steers never loads it, so the XDP path alone runs on kernels
//! without sk_lookup (before 5.9).

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, SockMap, lpm_trie::Key},
    programs::{ProgramError, SkLookup, sk_lookup::SkLookupLinkId},
};
use ipnet::IpNet;
use sentinel_common::{
    RuleValue, maps,
    steer::{
        self, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, MAX_RULES, MAX_SLOTS, NO_SLOT,
        SteerMeta, SteerRule, watch_populated,
    },
};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{
    KernelError, NewRule, Upsert, chain, clock,
    sys::{BPF_PROG_TEST_RUN, TestRunAttr, bpf},
    take,
};

pub(crate) const PROGRAM: &str = "sentinel_steer";

/// Transport a steering rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteerProtocol {
    Tcp,
    Udp,
}

impl SteerProtocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            SteerProtocol::Tcp => "tcp",
            SteerProtocol::Udp => "udp",
        }
    }
    const fn number(self) -> u32 {
        match self {
            SteerProtocol::Tcp => IPPROTO_TCP,
            SteerProtocol::Udp => IPPROTO_UDP,
        }
    }
}

/// One rule as the kernel gets it: connections to `prefix`, ports
/// `ports.0..=ports.1`, over `protocol`, land on the socket in `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteerTarget {
    pub prefix: IpNet,
    pub ports: (u16, u16),
    pub protocol: SteerProtocol,
    pub slot: u32,
}

impl SteerTarget {
    fn encode(&self) -> SteerRule {
        let (family, addr, mask) = match self.prefix {
            IpNet::V4(net) => {
                let word = |b: [u8; 4]| [u32::from_ne_bytes(b), 0, 0, 0];
                (
                    AF_INET,
                    word(net.network().octets()),
                    word(net.netmask().octets()),
                )
            }
            IpNet::V6(net) => {
                let words = |b: [u8; 16]| {
                    let mut w = [0u32; 4];
                    for (i, chunk) in b.chunks_exact(4).enumerate() {
                        w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    }
                    w
                };
                (
                    AF_INET6,
                    words(net.network().octets()),
                    words(net.netmask().octets()),
                )
            }
        };
        SteerRule {
            addr,
            mask,
            port_lo: self.ports.0,
            port_hi: self.ports.1,
            slot: self.slot,
            family,
            protocol: self.protocol.number(),
        }
    }

    /// Most specific first, since the program takes the first match:
    /// longer prefixes, then narrower port ranges.
    fn specificity(&self) -> (std::cmp::Reverse<u8>, u32) {
        (
            std::cmp::Reverse(self.prefix.prefix_len()),
            u32::from(self.ports.1) - u32::from(self.ports.0),
        )
    }
}

/// Connections steered to one slot, by reason (`steer::reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotStats {
    pub slot: u32,
    pub rule: u64,
    pub watchlist: u64,
    pub no_socket: u64,
}

/// A `bpf_sk_lookup` context for `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, Copy)]
pub struct TestLookup {
    pub protocol: SteerProtocol,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub local: IpAddr,
    pub local_port: u16,
}

/// `sizeof(struct bpf_sk_lookup)`: 68 bytes of fields, padded to 8.
const SK_LOOKUP_CTX_LEN: usize = 72;

impl TestLookup {
    fn encode(&self) -> Option<[u8; SK_LOOKUP_CTX_LEN]> {
        let mut ctx = [0u8; SK_LOOKUP_CTX_LEN];
        let family = match (self.remote, self.local) {
            (IpAddr::V4(remote), IpAddr::V4(local)) => {
                ctx[16..20].copy_from_slice(&remote.octets());
                ctx[40..44].copy_from_slice(&local.octets());
                AF_INET
            }
            (IpAddr::V6(remote), IpAddr::V6(local)) => {
                ctx[20..36].copy_from_slice(&remote.octets());
                ctx[44..60].copy_from_slice(&local.octets());
                AF_INET6
            }
            _ => return None,
        };
        ctx[8..12].copy_from_slice(&family.to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.protocol.number().to_ne_bytes());
        ctx[36..38].copy_from_slice(&self.remote_port.to_be_bytes());
        ctx[60..64].copy_from_slice(&u32::from(self.local_port).to_ne_bytes());
        Some(ctx)
    }
}

/// What a test run decided: the program's return value and the cookie of
/// the socket it selected, if any (`SO_COOKIE` of that socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestVerdict {
    pub action: u32,
    pub cookie: Option<u64>,
}

/// The steering maps of the control instance and the namespace link.
pub struct Steering {
    rules: Array<MapData, SteerRule>,
    sockets: SockMap<MapData>,
    meta: Array<MapData, SteerMeta>,
    stats: PerCpuArray<MapData, u64>,
    watch4: LpmTrie<MapData, [u8; 4], RuleValue>,
    watch6: LpmTrie<MapData, [u8; 16], RuleValue>,
    /// The bank the program reads now.
    bank: u32,
    quarantine: u32,
    populated: u32,
    attached: bool,
    /// Which listener each slot holds, by name (stable across reloads, so
    /// that a flip never sends a connection to another listener's slot).
    slots: BTreeMap<String, u32>,
}

/// A listener as [`Steering::plan`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct PlanListener<'a> {
    pub name: &'a str,
    pub bound: SocketAddr,
    pub quarantine: bool,
    /// Bound to `[::]` without `IPV6_V6ONLY`: the kernel gives it IPv4
    /// connections too ([`dual_stack`]).
    pub dual_stack: bool,
}

/// A configured rule, by listener name.
#[derive(Debug, Clone, Copy)]
pub struct PlanRule<'a> {
    pub listener: &'a str,
    pub prefix: IpNet,
    pub ports: (u16, u16),
    pub protocol: SteerProtocol,
}

/// What [`Steering::plan`] decided: the kernel rules, the quarantine
/// listener and whether anything is steered at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (listener, prefix, ports, protocol), listener by name.
    pub targets: Vec<(String, IpNet, (u16, u16), SteerProtocol)>,
    pub quarantine: Option<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| KernelError::OtherMap { name, source }
}

impl Steering {
    /// Takes the maps out of the control instance. The program is only
    /// looked up here; [`load`] verifies it when steering is first wanted.
    pub(crate) fn open(control: &mut Ebpf) -> Result<Self, KernelError> {
        steer_program(control)?;
        let mut steering = Self {
            rules: take(control, maps::STEER_RULES)?,
            sockets: take(control, maps::STEER_SOCKETS)?,
            meta: take(control, maps::STEER_META)?,
            stats: take(control, maps::STEER_STATS)?,
            watch4: take(control, maps::WATCH_V4)?,
            watch6: take(control, maps::WATCH_V6)?,
            bank: 0,
            quarantine: NO_SLOT,
            populated: 0,
            attached: false,
            slots: BTreeMap::new(),
        };
        // The watchlist is pinned and may hold entries from a previous run.
        steering.refresh_populated()?;
        steering.write_meta(SteerMeta::pack(0, 0))?;
        Ok(steering)
    }

    fn write_meta(&mut self, active: u32) -> Result<(), KernelError> {
        let meta = SteerMeta {
            active,
            quarantine: self.quarantine,
            populated: self.populated,
            _pad: 0,
        };
        self.meta.set(0, meta, 0).map_err(map_err(maps::STEER_META))
    }

    fn active(&self) -> Result<u32, KernelError> {
        Ok(self
            .meta
            .get(&0, 0)
            .map_err(map_err(maps::STEER_META))?
            .active)
    }

    fn refresh_populated(&mut self) -> Result<(), KernelError> {
        let mut bits = 0;
        if self.watch4.keys().next().is_some() {
            bits |= watch_populated::V4;
        }
        if self.watch6.keys().next().is_some() {
            bits |= watch_populated::V6;
        }
        self.populated = bits;
        Ok(())
    }

    /// Replaces the rule set and the quarantine slot. The new rules are
    /// written into the bank the program does not read, then one store
    /// makes them current: a connection sees the old set or the new one,
    /// never a mix.
    pub fn set_rules(
        &mut self,
        targets: &[SteerTarget],
        quarantine: Option<u32>,
    ) -> Result<(), KernelError> {
        if targets.len() > MAX_RULES as usize {
            return Err(KernelError::SteerRules {
                count: targets.len(),
                max: MAX_RULES,
            });
        }
        if let Some(slot) = targets
            .iter()
            .map(|t| t.slot)
            .chain(quarantine)
            .find(|s| *s >= MAX_SLOTS)
        {
            return Err(KernelError::SteerSlot {
                slot,
                max: MAX_SLOTS,
            });
        }
        let mut sorted = targets.to_vec();
        sorted.sort_by_key(SteerTarget::specificity);
        let next = 1 - self.bank;
        for (i, target) in sorted.iter().enumerate() {
            self.rules
                .set(next * MAX_RULES + i as u32, target.encode(), 0)
                .map_err(map_err(maps::STEER_RULES))?;
        }
        self.quarantine = quarantine.unwrap_or(NO_SLOT);
        self.write_meta(SteerMeta::pack(next, sorted.len() as u32))?;
        self.bank = next;
        Ok(())
    }

    /// Rules in force, in the order the program tries them.
    pub fn rule_count(&self) -> Result<u32, KernelError> {
        let meta = SteerMeta {
            active: self.active()?,
            ..SteerMeta::default()
        };
        Ok(meta.rules())
    }

    /// Puts a listening socket in `slot`. The socket map holds its own
    /// reference: the socket stays steerable until [`Self::clear_socket`],
    /// even if the caller closes its descriptor.
    pub fn set_socket<S: AsRawFd>(&mut self, slot: u32, socket: &S) -> Result<(), KernelError> {
        self.sockets
            .set(slot, socket, 0)
            .map_err(map_err(maps::STEER_SOCKETS))
    }

    /// Empties `slot`; connections a rule sends there fall back to the
    /// normal lookup (counted as `no_socket`).
    pub fn clear_socket(&mut self, slot: u32) -> Result<(), KernelError> {
        // The kernel answers EINVAL for a slot that holds no socket
        // (`__sock_map_delete`); aya has already checked the bounds.
        match self.sockets.clear_index(&slot) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
            {
                Ok(())
            }
            Err(source) => Err(map_err(maps::STEER_SOCKETS)(source)),
        }
    }

    /// Per-slot counters, summed over CPUs; slots never hit are left out.
    pub fn stats(&self) -> Vec<SlotStats> {
        let read = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        (0..MAX_SLOTS)
            .map(|slot| {
                let base = slot * steer::reason::COUNT;
                SlotStats {
                    slot,
                    rule: read(base + steer::reason::RULE),
                    watchlist: read(base + steer::reason::WATCHLIST),
                    no_socket: read(base + steer::reason::NO_SOCKET),
                }
            })
            .filter(|s| s.rule + s.watchlist + s.no_socket > 0)
            .collect()
    }

    /// Adds or replaces a watchlist entry; it steers from the next
    /// connection on.
    pub fn watch_upsert(&mut self, prefix: &IpNet, rule: &NewRule) -> Result<Upsert, KernelError> {
        let value = rule.value(prefix.prefix_len(), clock::now_ns());
        let existed = self.watch_get(prefix)?.is_some();
        let len = u32::from(prefix.prefix_len());
        let result = match prefix {
            IpNet::V4(net) => self
                .watch4
                .insert(&Key::new(len, net.network().octets()), value, 0),
            IpNet::V6(net) => self
                .watch6
                .insert(&Key::new(len, net.network().octets()), value, 0),
        };
        result.map_err(|source| match &source {
            MapError::SyscallError(e)
                if matches!(e.io_error.raw_os_error(), Some(libc::ENOSPC | libc::E2BIG)) =>
            {
                KernelError::WatchFull {
                    capacity: steer::DEFAULT_WATCH_ENTRIES,
                }
            }
            _ => KernelError::OtherMap {
                name: watch_map(prefix),
                source,
            },
        })?;
        self.populated |= watch_bit(prefix);
        let active = self.active()?;
        self.write_meta(active)?;
        Ok(if existed {
            Upsert::Replaced
        } else {
            Upsert::Created
        })
    }

    /// The entry stored under exactly `prefix`.
    pub fn watch_get(&self, prefix: &IpNet) -> Result<Option<RuleValue>, KernelError> {
        // An LPM lookup with this length returns the longest entry of at
        // most this length covering it: only one of the same length is it.
        let len = u32::from(prefix.prefix_len());
        let found = match prefix {
            IpNet::V4(net) => self.watch4.get(&Key::new(len, net.network().octets()), 0),
            IpNet::V6(net) => self.watch6.get(&Key::new(len, net.network().octets()), 0),
        };
        match found {
            Ok(value) if value.prefix_len == u32::from(prefix.prefix_len()) => Ok(Some(value)),
            Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(source) => Err(KernelError::OtherMap {
                name: watch_map(prefix),
                source,
            }),
        }
    }

    /// Removes the entry of exactly `prefix`; false when there was none.
    pub fn watch_remove(&mut self, prefix: &IpNet) -> Result<bool, KernelError> {
        let len = u32::from(prefix.prefix_len());
        let result = match prefix {
            IpNet::V4(net) => self.watch4.remove(&Key::new(len, net.network().octets())),
            IpNet::V6(net) => self.watch6.remove(&Key::new(len, net.network().octets())),
        };
        let removed = match result {
            Ok(()) => true,
            Err(MapError::KeyNotFound) => false,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                false
            }
            Err(source) => {
                return Err(KernelError::OtherMap {
                    name: watch_map(prefix),
                    source,
                });
            }
        };
        if removed {
            self.refresh_populated()?;
            let active = self.active()?;
            self.write_meta(active)?;
        }
        Ok(removed)
    }

    /// Every watchlist entry, IPv4 first.
    pub fn watch_entries(&self) -> Result<Vec<(IpNet, RuleValue)>, KernelError> {
        let mut out = Vec::new();
        for item in self.watch4.iter() {
            let (key, value) = item.map_err(map_err(maps::WATCH_V4))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(32);
            if let Ok(net) = ipnet::Ipv4Net::new(key.data().into(), len) {
                out.push((IpNet::V4(net), value));
            }
        }
        for item in self.watch6.iter() {
            let (key, value) = item.map_err(map_err(maps::WATCH_V6))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(128);
            if let Ok(net) = ipnet::Ipv6Net::new(key.data().into(), len) {
                out.push((IpNet::V6(net), value));
            }
        }
        Ok(out)
    }

    /// Removes watchlist entries whose TTL has passed; returns them.
    pub fn watch_reap(&mut self, now_ns: u64) -> Result<Vec<IpNet>, KernelError> {
        let expired: Vec<IpNet> = self
            .watch_entries()?
            .into_iter()
            .filter(|(_, value)| value.is_expired(now_ns))
            .map(|(prefix, _)| prefix)
            .collect();
        let mut reaped = Vec::new();
        for prefix in expired {
            if self.watch_remove(&prefix)? {
                reaped.push(prefix);
            }
        }
        Ok(reaped)
    }

    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Whether a quarantine listener is steered to: only then does a
    /// watchlist entry change where connections land.
    pub fn quarantines(&self) -> bool {
        self.attached && self.quarantine != NO_SLOT
    }

    /// The kernel rules for `rules` and `listeners`. With a quarantine
    /// listener, each other listener's own address and port is a rule too,
    /// so that watchlisted sources are quarantined whether they come
    /// through a steered address or straight to a listener. Nothing else
    /// is added: what no rule and no listener names is never steered.
    pub fn plan(rules: &[PlanRule<'_>], listeners: &[PlanListener<'_>]) -> Plan {
        let quarantine = listeners
            .iter()
            .find(|l| l.quarantine)
            .map(|l| l.name.to_owned());
        let mut targets: Vec<_> = rules
            .iter()
            .filter(|r| listeners.iter().any(|l| l.name == r.listener))
            .map(|r| (r.listener.to_owned(), r.prefix, r.ports, r.protocol))
            .collect();
        if quarantine.is_some() {
            for l in listeners.iter().filter(|l| !l.quarantine) {
                let ip = l.bound.ip();
                let port = l.bound.port();
                let mut own = vec![if ip.is_unspecified() {
                    IpNet::new(ip, 0)
                } else {
                    IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 })
                }];
                // The sk_lookup program sees an IPv4 connection to a
                // dual-stack socket as AF_INET: only an IPv4 rule matches it.
                if l.dual_stack {
                    own.push(IpNet::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0));
                }
                for prefix in own.into_iter().flatten() {
                    targets.push((l.name.to_owned(), prefix, (port, port), SteerProtocol::Tcp));
                }
            }
        }
        if targets.is_empty() {
            return Plan {
                targets,
                quarantine: None,
            };
        }
        Plan {
            targets,
            quarantine,
        }
    }

    /// Makes the kernel steer as `plan` says, with the listeners' sockets
    /// `sockets` (by name). Sockets go in first, then the rules flip, then
    /// slots no longer used are emptied: no connection is ever sent to a
    /// slot that holds another listener.
    pub fn apply(
        &mut self,
        plan: &Plan,
        sockets: &[(&str, BorrowedFd<'_>)],
    ) -> Result<(), KernelError> {
        let wanted: Vec<&str> = plan
            .targets
            .iter()
            .map(|t| t.0.as_str())
            .chain(plan.quarantine.as_deref())
            .collect();
        let mut assigned = self.slots.clone();
        assigned.retain(|name, _| wanted.contains(&name.as_str()));
        for name in &wanted {
            if assigned.contains_key(*name) {
                continue;
            }
            let free = (0..MAX_SLOTS).find(|s| !assigned.values().any(|v| v == s));
            let Some(slot) = free else {
                return Err(KernelError::SteerSlot {
                    slot: MAX_SLOTS,
                    max: MAX_SLOTS,
                });
            };
            // A reused slot starts its counters again from zero.
            self.reset_stats(slot)?;
            assigned.insert((*name).to_owned(), slot);
        }
        for (name, slot) in &assigned {
            if let Some((_, fd)) = sockets.iter().find(|(n, _)| n == name) {
                self.set_socket(*slot, fd)?;
            }
        }
        let targets: Vec<SteerTarget> = plan
            .targets
            .iter()
            .filter_map(|(name, prefix, ports, protocol)| {
                Some(SteerTarget {
                    prefix: *prefix,
                    ports: *ports,
                    protocol: *protocol,
                    slot: *assigned.get(name)?,
                })
            })
            .collect();
        let quarantine = plan
            .quarantine
            .as_ref()
            .and_then(|q| assigned.get(q).copied());
        self.set_rules(&targets, quarantine)?;
        let freed: Vec<u32> = self
            .slots
            .values()
            .filter(|slot| !assigned.values().any(|v| v == *slot))
            .copied()
            .collect();
        for slot in freed {
            self.clear_socket(slot)?;
        }
        self.slots = assigned;
        Ok(())
    }

    fn reset_stats(&mut self, slot: u32) -> Result<(), KernelError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, io_error)| KernelError::OtherMap {
            name: maps::STEER_STATS,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error,
            }),
        })?;
        for why in 0..steer::reason::COUNT {
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(|io_error| {
                KernelError::OtherMap {
                    name: maps::STEER_STATS,
                    source: MapError::SyscallError(aya::sys::SyscallError {
                        call: "per-cpu values",
                        io_error,
                    }),
                }
            })?;
            self.stats
                .set(slot * steer::reason::COUNT + why, zeros, 0)
                .map_err(map_err(maps::STEER_STATS))?;
        }
        Ok(())
    }

    /// Steering counters by listener name (slots of listeners no longer
    /// steered to are left out).
    pub fn listener_stats(&self) -> Vec<(String, SlotStats)> {
        let stats = self.stats();
        self.slots
            .iter()
            .map(|(name, slot)| {
                let s = stats
                    .iter()
                    .find(|s| s.slot == *slot)
                    .copied()
                    .unwrap_or(SlotStats {
                        slot: *slot,
                        ..SlotStats::default()
                    });
                (name.clone(), s)
            })
            .collect()
    }
}

fn watch_map(prefix: &IpNet) -> &'static str {
    match prefix {
        IpNet::V4(_) => maps::WATCH_V4,
        IpNet::V6(_) => maps::WATCH_V6,
    }
}

fn watch_bit(prefix: &IpNet) -> u32 {
    match prefix {
        IpNet::V4(_) => watch_populated::V4,
        IpNet::V6(_) => watch_populated::V6,
    }
}

pub(crate) fn steer_program(control: &mut Ebpf) -> Result<&mut SkLookup, KernelError> {
    control
        .program_mut(PROGRAM)
        .ok_or_else(|| KernelError::Verify(Box::new(ProgramError::UnexpectedProgramType)))?
        .try_into()
        .map_err(|e| KernelError::Verify(Box::new(e)))
}

/// Loads (verifies) the program unless it already is: a kernel without
/// `sk_lookup` answers here.
pub(crate) fn load(control: &mut Ebpf) -> Result<(), KernelError> {
    let program = steer_program(control)?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|e| KernelError::Verify(Box::new(e)))?;
        info!("sk_lookup steering program loaded");
    }
    Ok(())
}

/// Attaches the program (loading it first if needed) to the network
/// namespace of this process. The link belongs to the program, so dropping
/// the control instance (the daemon stopping, or crashing) detaches it as
/// well.
pub(crate) fn attach(
    control: &mut Ebpf,
    steering: &mut Steering,
) -> Result<SkLookupLinkId, KernelError> {
    let netns = File::open("/proc/self/ns/net").map_err(|e| KernelError::SteerAttach {
        detail: format!("cannot open /proc/self/ns/net: {e}"),
    })?;
    load(control)?;
    let program = steer_program(control)?;
    let id = program
        .attach(netns.as_fd())
        .map_err(|e| KernelError::SteerAttach { detail: chain(&e) })?;
    steering.attached = true;
    info!("sk_lookup steering attached to the network namespace");
    Ok(id)
}

pub(crate) fn detach(control: &mut Ebpf, steering: &mut Steering, id: SkLookupLinkId) {
    if let Ok(program) = steer_program(control) {
        let _ = program.detach(id);
    }
    if steering.attached {
        steering.attached = false;
        info!("sk_lookup steering detached");
    }
}

/// Runs the program on `lookup` with `BPF_PROG_TEST_RUN`; it must be
/// loaded ([`load`]).
pub(crate) fn test_run(control: &Ebpf, lookup: &TestLookup) -> Result<TestVerdict, KernelError> {
    let ctx = lookup.encode().ok_or_else(|| {
        KernelError::TestRun(Box::new(ProgramError::SyscallError(
            aya::sys::SyscallError {
                call: "bpf_sk_lookup",
                io_error: std::io::Error::from_raw_os_error(libc::EINVAL),
            },
        )))
    })?;
    let program: &SkLookup = control
        .program(PROGRAM)
        .ok_or_else(|| KernelError::TestRun(Box::new(ProgramError::UnexpectedProgramType)))?
        .try_into()
        .map_err(|e| KernelError::TestRun(Box::new(e)))?;
    let fd = program
        .fd()
        .map_err(|e| KernelError::TestRun(Box::new(e)))?
        .as_fd()
        .as_raw_fd();
    let mut out = [0u8; SK_LOOKUP_CTX_LEN];
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        repeat: 1,
        ctx_size_in: SK_LOOKUP_CTX_LEN as u32,
        ctx_size_out: SK_LOOKUP_CTX_LEN as u32,
        ctx_in: ctx.as_ptr() as u64,
        ctx_out: out.as_mut_ptr() as u64,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is the `test` member of `bpf_attr`; `ctx_in` and
    // `ctx_out` point at buffers of the sizes given, live for the call.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }.map_err(|io_error| {
        KernelError::TestRun(Box::new(ProgramError::SyscallError(
            aya::sys::SyscallError {
                call: "bpf_prog_test_run",
                io_error,
            },
        )))
    })?;
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&out[0..8]);
    let cookie = u64::from_ne_bytes(cookie);
    Ok(TestVerdict {
        action: attr.retval,
        cookie: (cookie != 0).then_some(cookie),
    })
}

/// Whether a listener bound to `bound` takes IPv4 connections as well:
/// bound to `[::]` and without `IPV6_V6ONLY` (whose default is the
/// `net.ipv6.bindv6only` sysctl). An unreadable option counts as IPv6 only,
/// which at worst leaves an IPv4 connection to the kernel's own lookup.
pub fn dual_stack<S: AsRawFd>(bound: SocketAddr, socket: &S) -> bool {
    if !(bound.is_ipv6() && bound.ip().is_unspecified()) {
        return false;
    }
    let mut v6only: libc::c_int = 1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v6only`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw mut v6only).cast(),
            &mut len,
        )
    };
    rc == 0 && v6only == 0
}

/// `SO_COOKIE` of a socket: what a test run reports for the socket it
/// selected.
pub fn socket_cookie<S: AsRawFd>(socket: &S) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests;
