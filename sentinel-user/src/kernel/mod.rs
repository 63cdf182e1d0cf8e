//! The kernel fast path from userspace: loading the XDP program, pinning and
//! reusing its maps, attaching it to interfaces, and reading its counters.
//!
//! One program instance is loaded per attached interface, all sharing the
//! pinned allowlist, denylist and port-policy maps, each with its own
//! per-CPU counters: that gives per-interface metrics without a lookup in
//! the fast path. One more, never attached, is the "control" instance: it
//! verifies the program at start even when no interface is configured, and
//! serves `BPF_PROG_TEST_RUN` for tests and benchmarks.

pub mod clock;
mod pin;
mod prefix4;
mod prefix6;
mod region;
mod rule_maps;
pub mod rules;
pub mod steer;
pub mod sys;
mod table;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode as AyaXdpMode,
        sk_lookup::SkLookupLinkId,
    },
};
use ipnet::IpNet;
use sentinel_common::{
    Counters, PORT_POLICY_ENTRIES, maps,
    prefix::{direct, filter},
    proto, reason,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    config::{KernelConfig, PortPolicy, StaticRule, XdpMode},
    net::RuleList,
};
use prefix4::Prefix4Index;
use prefix6::Prefix6Index;
use region::Region;
use rule_maps::{HostMap, RuleMap, v4_key, v4_prefix, v6_key, v6_prefix};
pub use rules::{Imported, NewRule, RuleTables, Upsert};
use steer::{Steering, TestLookup, TestVerdict};
use table::KernelTable;

/// The eBPF object, compiled by build.rs and carried inside the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sentinel.bpf.o"));

const PROGRAM: &str = "sentinel_xdp";

/// Source recorded on entries written from the configuration file.
pub const SOURCE_CONFIG: &str = "config";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount bpffs at {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not on a bpf filesystem; mount one with `mount -t bpf bpf {path}`", path = .path.display())]
    NotBpffs { path: PathBuf },
    #[error(
        "the maps pinned under {path} come from an incompatible Sentinel version: {detail}; remove that directory (this discards its allowlist and denylist) or set kernel.pin-path to another one",
        path = .path.display()
    )]
    Incompatible { path: PathBuf, detail: String },
    #[error("cannot load the XDP program: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the kernel rejected the XDP program: {0}")]
    Verify(#[source] Box<ProgramError>),
    #[error("interface '{interface}' does not exist")]
    NoInterface { interface: String },
    #[error("cannot attach XDP to '{interface}' in {mode} mode: {detail}")]
    Attach {
        interface: String,
        mode: &'static str,
        /// The whole cause chain: aya's errors name the syscall, their
        /// sources say what the kernel answered.
        detail: String,
    },
    #[error(
        "the {list} is full ({capacity} entries): remove entries or raise kernel.capacity.{option}"
    )]
    Full {
        list: RuleList,
        capacity: u32,
        option: &'static str,
    },
    #[error("cannot {op} the {list}: {source}")]
    Map {
        op: &'static str,
        list: RuleList,
        #[source]
        source: MapError,
    },
    #[error("map {name}: {source}")]
    OtherMap {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{count} steering rules are configured; the kernel program holds at most {max}")]
    SteerRules { count: usize, max: u32 },
    #[error("steering slot {slot} is out of range (at most {max} listeners can be steered to)")]
    SteerSlot { slot: u32, max: u32 },
    #[error("the watchlist is full ({capacity} entries per family): remove entries")]
    WatchFull { capacity: u32 },
    #[error("cannot attach the sk_lookup steering program: {detail}")]
    SteerAttach { detail: String },
    #[error("BPF_PROG_TEST_RUN failed: {0}")]
    TestRun(#[source] Box<ProgramError>),
}

/// An error and its sources, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Counters of one program instance, by reason (index: `reason::*`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceStats {
    pub interface: String,
    /// `native` or `generic`.
    pub mode: String,
    pub reasons: Vec<ReasonStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReasonStats {
    pub reason: String,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
}

/// A program instance attached to one interface; dropping it detaches.
struct Attachment {
    interface: String,
    mode: &'static str,
    stats: PerCpuArray<MapData, Counters>,
    // Owns the program and its link.
    _ebpf: Ebpf,
}

/// The loaded fast path.
pub struct Kernel {
    pin_path: PathBuf,
    capacity: crate::config::Capacity,
    control: Ebpf,
    control_stats: PerCpuArray<MapData, Counters>,
    ports: Array<MapData, u8>,
    pub tables: RuleTables,
    /// Steering rules, listener sockets and the watchlist.
    pub steering: Steering,
    steer_link: Option<SkLookupLinkId>,
    attachments: Vec<Attachment>,
}

/// Each sized map with the `max_entries` its list's capacity gives it and
/// the option that sets that capacity. The host map, the IPv4 rules and
/// long-prefix maps and the IPv6 prefix map of a list and family each hold
/// `capacity` entries (the rules array one more: element 0 is never a
/// rule); the direct table and the filter are sized from it
/// (`sentinel_common::prefix`).
fn capacities(cfg: &crate::config::Capacity) -> Vec<(&'static str, u32, &'static str)> {
    let v4 = |[direct_map, rules, long, host]: [&'static str; 4], capacity: u32, option| {
        [
            (
                direct_map,
                direct::elements(direct::bits_for(capacity)),
                option,
            ),
            (rules, capacity.saturating_add(1), option),
            (long, capacity, option),
            (host, capacity, option),
        ]
    };
    let v6 = |[filter_map, prefixes, host]: [&'static str; 3], capacity: u32, option| {
        [
            (
                filter_map,
                filter::elements(filter::bits_for(capacity)),
                option,
            ),
            (prefixes, capacity, option),
            (host, capacity, option),
        ]
    };
    let mut out = Vec::new();
    out.extend(v4(
        [
            maps::ALLOW_V4_DIRECT,
            maps::ALLOW_V4_RULES,
            maps::ALLOW_V4_LONG,
            maps::ALLOW_HOST_V4,
        ],
        cfg.allowlist_v4,
        "allowlist-v4",
    ));
    out.extend(v6(
        [
            maps::ALLOW_V6_FILTER,
            maps::ALLOW_V6_PREFIX,
            maps::ALLOW_HOST_V6,
        ],
        cfg.allowlist_v6,
        "allowlist-v6",
    ));
    out.extend(v4(
        [
            maps::DENY_V4_DIRECT,
            maps::DENY_V4_RULES,
            maps::DENY_V4_LONG,
            maps::DENY_HOST_V4,
        ],
        cfg.denylist_v4,
        "denylist-v4",
    ));
    out.extend(v6(
        [
            maps::DENY_V6_FILTER,
            maps::DENY_V6_PREFIX,
            maps::DENY_HOST_V6,
        ],
        cfg.denylist_v6,
        "denylist-v6",
    ));
    out
}

/// Typed views of the rule stores of a loaded instance, in `Slot` order.
fn rule_maps(ebpf: &mut Ebpf) -> Result<[Box<dyn RuleMap>; 8], KernelError> {
    fn region<T: Copy>(e: &mut Ebpf, name: &'static str) -> Result<Region<T>, KernelError> {
        let map = match e.take_map(name) {
            Some(aya::maps::Map::Array(data)) => data,
            Some(_) => {
                return Err(KernelError::OtherMap {
                    name,
                    source: MapError::InvalidMapType { map_type: 0 },
                });
            }
            None => {
                return Err(KernelError::OtherMap {
                    name,
                    source: MapError::InvalidName { name: name.into() },
                });
            }
        };
        Region::new(map).map_err(|source| KernelError::OtherMap { name, source })
    }
    fn prefix4(
        e: &mut Ebpf,
        [direct_map, rules, long]: [&'static str; 3],
    ) -> Result<Box<dyn RuleMap>, KernelError> {
        let direct_table = region(e, direct_map)?;
        let rules_array = region(e, rules)?;
        let long_map = KernelTable::new(take::<HashMap<_, _, u32>>(e, long)?);
        let index = Prefix4Index::open(direct_table, rules_array, long_map).map_err(|source| {
            KernelError::OtherMap {
                name: rules,
                source,
            }
        })?;
        Ok(Box::new(index))
    }
    fn prefix6(
        e: &mut Ebpf,
        [filter_map, prefixes]: [&'static str; 2],
    ) -> Result<Box<dyn RuleMap>, KernelError> {
        let filter_table = region(e, filter_map)?;
        let prefix_map = KernelTable::new(take::<HashMap<_, _, _>>(e, prefixes)?);
        let index = Prefix6Index::open(filter_table, prefix_map).map_err(|source| {
            KernelError::OtherMap {
                name: prefixes,
                source,
            }
        })?;
        Ok(Box::new(index))
    }
    fn host4(e: &mut Ebpf, name: &'static str) -> Result<Box<dyn RuleMap>, KernelError> {
        let map = take::<HashMap<_, [u8; 4], _>>(e, name)?;
        Ok(Box::new(HostMap::new(map, v4_key, v4_prefix, 32)))
    }
    fn host6(e: &mut Ebpf, name: &'static str) -> Result<Box<dyn RuleMap>, KernelError> {
        let map = take::<HashMap<_, [u8; 16], _>>(e, name)?;
        Ok(Box::new(HostMap::new(map, v6_key, v6_prefix, 128)))
    }
    Ok([
        prefix4(
            ebpf,
            [
                maps::ALLOW_V4_DIRECT,
                maps::ALLOW_V4_RULES,
                maps::ALLOW_V4_LONG,
            ],
        )?,
        prefix6(ebpf, [maps::ALLOW_V6_FILTER, maps::ALLOW_V6_PREFIX])?,
        host4(ebpf, maps::ALLOW_HOST_V4)?,
        host6(ebpf, maps::ALLOW_HOST_V6)?,
        prefix4(
            ebpf,
            [
                maps::DENY_V4_DIRECT,
                maps::DENY_V4_RULES,
                maps::DENY_V4_LONG,
            ],
        )?,
        prefix6(ebpf, [maps::DENY_V6_FILTER, maps::DENY_V6_PREFIX])?,
        host4(ebpf, maps::DENY_HOST_V4)?,
        host6(ebpf, maps::DENY_HOST_V6)?,
    ])
}

fn load_instance(pin_path: &Path, cfg: &crate::config::Capacity) -> Result<Ebpf, KernelError> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = maps::PINNED
        .iter()
        .map(|name| (*name, pin::map_path(pin_path, name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, entries, _) in capacities(cfg) {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| KernelError::Load(Box::new(e)))?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| {
            KernelError::Load(Box::new(aya::EbpfError::ProgramError(
                ProgramError::UnexpectedProgramType,
            )))
        })?
        .try_into()
        .map_err(|e| KernelError::Verify(Box::new(e)))?;
    program
        .load()
        .map_err(|e| KernelError::Verify(Box::new(e)))?;
    Ok(ebpf)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::OtherMap {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| KernelError::OtherMap { name, source })
}

fn sum(stats: &PerCpuArray<MapData, Counters>) -> Vec<ReasonStats> {
    (0..reason::COUNT)
        .map(|r| {
            let total = stats
                .get(&r, 0)
                .map(|per_cpu| {
                    per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
                        packets: acc.packets + c.packets,
                        bytes: acc.bytes + c.bytes,
                    })
                })
                .unwrap_or_default();
            ReasonStats {
                reason: reason::name(r).to_owned(),
                action: reason::action(r).to_owned(),
                packets: total.packets,
                bytes: total.bytes,
            }
        })
        .collect()
}

impl Kernel {
    /// Mounts bpffs if needed, checks and reuses the pinned maps (creating
    /// them on first start), and loads the control instance.
    pub fn open(cfg: &KernelConfig) -> Result<Self, KernelError> {
        pin::prepare(&cfg.pin_path)?;
        let pinned = pin::check_layout(&cfg.pin_path)?;
        let wanted = capacities(&cfg.capacity);
        let mut warned: Vec<&str> = Vec::new();
        for (name, have) in &pinned {
            if let Some((_, want, option)) = wanted.iter().find(|(n, _, _)| n == name)
                && want != have
                && !warned.contains(option)
            {
                warned.push(option);
                warn!(
                    map = name,
                    pinned = have,
                    configured = want,
                    "kernel.capacity.{option} differs from the pinned maps, which keep their capacity; remove {} to apply it (this discards the allowlist and denylist)",
                    cfg.pin_path.display()
                );
            }
        }
        let fresh = pinned.is_empty();

        let mut control = load_instance(&cfg.pin_path, &cfg.capacity)?;
        let rule_maps = rule_maps(&mut control)?;
        // Also stamps the layout version into SENTINEL_META.
        let tables = RuleTables::new(rule_maps, take(&mut control, maps::META)?)?;
        let ports = take(&mut control, maps::PORT_POLICY)?;
        let control_stats = take(&mut control, maps::STATS)?;
        let steering = Steering::open(&mut control)?;
        info!(
            pin_path = %cfg.pin_path.display(),
            reused = !fresh,
            denylist = tables.count(RuleList::Deny),
            allowlist = tables.count(RuleList::Allow),
            "kernel maps ready"
        );
        Ok(Self {
            pin_path: cfg.pin_path.clone(),
            capacity: cfg.capacity,
            control,
            control_stats,
            ports,
            tables,
            steering,
            steer_link: None,
            attachments: Vec::new(),
        })
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// Attaches a new program instance to `interface`.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<&'static str, KernelError> {
        if self.attachments.iter().any(|a| a.interface == interface) {
            return Ok(self
                .attachments
                .iter()
                .find(|a| a.interface == interface)
                .map_or("native", |a| a.mode));
        }
        let c_name = std::ffi::CString::new(interface).map_err(|_| KernelError::NoInterface {
            interface: interface.to_owned(),
        })?;
        // SAFETY: NUL-terminated string valid for the call.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(KernelError::NoInterface {
                interface: interface.to_owned(),
            });
        }
        let mut ebpf = load_instance(&self.pin_path, &self.capacity)?;
        let stats = take(&mut ebpf, maps::STATS)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| KernelError::Verify(Box::new(ProgramError::UnexpectedProgramType)))?
            .try_into()
            .map_err(|e| KernelError::Verify(Box::new(e)))?;
        let attach = |program: &mut Xdp, mode: AyaXdpMode, name: &'static str| {
            program
                .attach(interface, mode)
                .map(|_| name)
                .map_err(|source| KernelError::Attach {
                    interface: interface.to_owned(),
                    mode: name,
                    detail: chain(&source),
                })
        };
        let mode = match mode {
            XdpMode::Native => attach(program, AyaXdpMode::Driver, "native")?,
            XdpMode::Generic => attach(program, AyaXdpMode::Skb, "generic")?,
            XdpMode::Auto => match attach(program, AyaXdpMode::Driver, "native") {
                Ok(mode) => mode,
                Err(error) => {
                    warn!(
                        interface,
                        %error,
                        "native XDP is not available; falling back to generic mode, which runs after the socket buffer is allocated"
                    );
                    attach(program, AyaXdpMode::Skb, "generic")?
                }
            },
        };
        info!(interface, mode, "XDP program attached");
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode,
            stats,
            _ebpf: ebpf,
        });
        Ok(mode)
    }

    /// Detaches from one interface.
    pub fn detach(&mut self, interface: &str) {
        if let Some(at) = self
            .attachments
            .iter()
            .position(|a| a.interface == interface)
        {
            self.attachments.remove(at);
            info!(interface, "XDP program detached");
        }
    }

    /// Detaches from every interface (also done on drop).
    pub fn detach_all(&mut self) {
        for attachment in self.attachments.drain(..) {
            info!(interface = %attachment.interface, "XDP program detached");
        }
    }

    /// Interfaces attached, with their mode.
    pub fn attached(&self) -> Vec<(String, &'static str)> {
        self.attachments
            .iter()
            .map(|a| (a.interface.clone(), a.mode))
            .collect()
    }

    /// Per-CPU counters summed, per attached interface.
    pub fn stats(&self) -> Vec<InterfaceStats> {
        self.attachments
            .iter()
            .map(|a| InterfaceStats {
                interface: a.interface.clone(),
                mode: a.mode.to_owned(),
                reasons: sum(&a.stats),
            })
            .collect()
    }

    /// How many instructions the kernel's verifier processed to accept the
    /// program (`verified_insns` of its info, kernel 5.16+): the verifier
    /// gives up at 1,000,000, so this is the program's headroom.
    pub fn verified_instructions(&self) -> Option<u32> {
        let program: &Xdp = self.control.program(PROGRAM)?.try_into().ok()?;
        program.info().ok()?.verified_instruction_count()
    }

    /// Counters of the control instance (test runs only).
    pub fn control_stats(&self) -> Vec<ReasonStats> {
        sum(&self.control_stats)
    }

    /// Runs the program on `packet` with `BPF_PROG_TEST_RUN`, `repeat`
    /// times; returns the XDP action and the kernel's mean time per run.
    pub fn test_run(&self, packet: &[u8], repeat: u32) -> Result<(u32, Duration), KernelError> {
        let program: &Xdp = self
            .control
            .program(PROGRAM)
            .ok_or_else(|| KernelError::TestRun(Box::new(ProgramError::UnexpectedProgramType)))?
            .try_into()
            .map_err(|e| KernelError::TestRun(Box::new(e)))?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| KernelError::TestRun(Box::new(e)))?;
        Ok((result.return_value, result.duration))
    }

    /// Attaches the steering program to this process's network namespace,
    /// if it is not already.
    pub fn attach_steering(&mut self) -> Result<(), KernelError> {
        if self.steer_link.is_none() {
            self.steer_link = Some(steer::attach(&mut self.control, &mut self.steering)?);
        }
        Ok(())
    }

    /// Detaches the steering program: every connection goes back to the
    /// kernel's own socket lookup.
    pub fn detach_steering(&mut self) {
        if let Some(id) = self.steer_link.take() {
            steer::detach(&mut self.control, &mut self.steering, id);
        }
    }

    /// Loads (verifies) the steering program without attaching it; done by
    /// [`Self::attach_steering`] when needed, and by whoever test-runs it.
    pub fn load_steering(&mut self) -> Result<(), KernelError> {
        steer::load(&mut self.control)
    }

    /// Runs the steering program on a crafted lookup (`BPF_PROG_TEST_RUN`);
    /// it must be loaded ([`Self::load_steering`]).
    pub fn steer_test_run(&self, lookup: &TestLookup) -> Result<TestVerdict, KernelError> {
        steer::test_run(&self.control, lookup)
    }

    /// Replaces the port policy with `policy`.
    pub fn set_port_policy(&mut self, policy: &PortPolicy) -> Result<(), KernelError> {
        let mut denied = vec![0u8; PORT_POLICY_ENTRIES as usize];
        for (block, ranges) in [
            (proto::TCP, &policy.deny_tcp),
            (proto::UDP, &policy.deny_udp),
        ] {
            for &(lo, hi) in ranges {
                for port in lo..=hi {
                    denied[(block * 65_536 + u32::from(port)) as usize] = 1;
                }
            }
        }
        let map_err = |source| KernelError::OtherMap {
            name: maps::PORT_POLICY,
            source,
        };
        // Only write what differs: an unchanged policy costs one read pass.
        for (index, want) in denied.iter().enumerate() {
            let index = index as u32;
            let have = self.ports.get(&index, 0).map_err(map_err)?;
            if have != *want {
                self.ports.set(index, *want, 0).map_err(map_err)?;
            }
        }
        let tcp: usize = policy
            .deny_tcp
            .iter()
            .map(|(l, h)| usize::from(h - l) + 1)
            .sum();
        let udp: usize = policy
            .deny_udp
            .iter()
            .map(|(l, h)| usize::from(h - l) + 1)
            .sum();
        info!(tcp_ports = tcp, udp_ports = udp, "port policy applied");
        Ok(())
    }

    /// Makes the entries with source `config` in `list` exactly `rules`:
    /// adds or refreshes those listed, removes those no longer listed.
    /// Entries added at run time (admin, agents) are left alone.
    pub fn sync_static(
        &mut self,
        list: RuleList,
        rules: &[StaticRule],
    ) -> Result<SyncReport, KernelError> {
        let mut report = SyncReport::default();
        let stale: Vec<IpNet> = self
            .tables
            .entries(list)?
            .into_iter()
            .filter(|(prefix, value)| {
                rules::text(&value.source) == SOURCE_CONFIG
                    && !rules.iter().any(|r| r.prefix == *prefix)
            })
            .map(|(prefix, _)| prefix)
            .collect();
        for prefix in stale {
            if self.tables.remove(list, &prefix)? {
                report.removed += 1;
            }
        }
        for rule in rules {
            let new = NewRule {
                ttl: None,
                source: SOURCE_CONFIG.to_owned(),
                reason: rule.reason.clone(),
            };
            match self.tables.upsert(list, &rule.prefix, &new)? {
                Upsert::Created => report.added += 1,
                Upsert::Replaced => report.kept += 1,
            }
        }
        Ok(report)
    }
}

/// What [`Kernel::sync_static`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub kept: usize,
    pub removed: usize,
}
