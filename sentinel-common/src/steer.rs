//! Connection steering: the maps of the `sk_lookup` program, which picks the
//! listening socket a new TCP connection (or UDP datagram) lands on.
//!
//! The program sees a connection only after the kernel found it addressed
//! to this host. It then walks the active bank of [`SteerRule`]s, first
//! match wins; without a match it leaves the connection alone, so the
//! kernel's own socket lookup proceeds as if the program were not there.
//! With a match, a source on the watchlist (an LPM trie of
//! [`crate::RuleValue`] entries, IPv4 and IPv6) is sent to the quarantine
//! slot instead of the rule's. Watchlist keys are the kernel's
//! `bpf_lpm_trie_key` (a `u32` prefix length, then the address bytes), which
//! aya's `lpm_trie::Key` already is on both sides. A slot is an index into the `STEER_SOCKETS`
//! socket map, where the daemon puts its listeners' sockets.
//!
//! Rules are written in two banks so that a reload never exposes a half
//! written rule set: the daemon fills the inactive bank, then flips
//! [`SteerMeta::active`] with one aligned 32-bit store.

use core::mem::size_of;

/// Rules per bank.
pub const MAX_RULES: u32 = 64;
/// Two banks: the active one and the one being written.
pub const BANKS: u32 = 2;
/// Entries of the `STEER_RULES` array.
pub const RULE_ENTRIES: u32 = MAX_RULES * BANKS;
/// Entries of the `STEER_SOCKETS` socket map: listener slots.
pub const MAX_SLOTS: u32 = 64;
/// [`SteerMeta::quarantine`] when no listener is the quarantine one.
pub const NO_SLOT: u32 = u32::MAX;
/// Default capacity of each watchlist trie (IPv4 and IPv6).
pub const DEFAULT_WATCH_ENTRIES: u32 = 65_536;

/// `SteerRule::family`, as in `bpf_sk_lookup.family`.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
/// `SteerRule::protocol`, as in `bpf_sk_lookup.protocol`.
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;

/// One steering rule: destinations in `addr/mask`, ports `port_lo..=port_hi`
/// (host order), of `protocol` and `family`, go to `slot`.
///
/// `addr` and `mask` hold the address bytes as the kernel stores
/// `local_ip4`/`local_ip6` (network order in memory, read as native `u32`
/// words); IPv4 uses word 0 only. `addr` is already masked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerRule {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
    pub port_lo: u16,
    pub port_hi: u16,
    pub slot: u32,
    pub family: u32,
    pub protocol: u32,
}

/// Value of the one-entry `STEER_META` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerMeta {
    /// `bank << 16 | rules`: the bank the program reads and how many rules
    /// it holds. One word, so that a flip is a single store.
    pub active: u32,
    /// Slot of the quarantine listener, or [`NO_SLOT`].
    pub quarantine: u32,
    /// [`watch_populated`] bits: which watchlist tries hold entries.
    pub populated: u32,
    pub _pad: u32,
}

impl SteerMeta {
    pub const fn pack(bank: u32, rules: u32) -> u32 {
        (bank & 1) << 16 | (rules & 0xffff)
    }
    pub const fn bank(&self) -> u32 {
        (self.active >> 16) & 1
    }
    /// Rules in the active bank, at most [`MAX_RULES`].
    pub const fn rules(&self) -> u32 {
        let n = self.active & 0xffff;
        if n > MAX_RULES { MAX_RULES } else { n }
    }
}

/// Bits of [`SteerMeta::populated`].
pub mod watch_populated {
    pub const V4: u32 = 1 << 0;
    pub const V6: u32 = 1 << 1;
}

/// Why the program decided what it did, per slot: index
/// `slot * reason::COUNT + reason` of the `STEER_STATS` per-CPU array of
/// `u64` connection counts.
pub mod reason {
    /// A rule matched: sent to its listener.
    pub const RULE: u32 = 0;
    /// A rule matched and the source is watchlisted: sent to quarantine
    /// (counted under the quarantine slot).
    pub const WATCHLIST: u32 = 1;
    /// A rule matched but its slot holds no socket, or the kernel refused
    /// the socket: left to the normal lookup.
    pub const NO_SOCKET: u32 = 2;
    pub const COUNT: u32 = 3;

    pub const fn name(reason: u32) -> &'static str {
        match reason {
            RULE => "rule",
            WATCHLIST => "watchlist",
            NO_SOCKET => "no_socket",
            _ => "unknown",
        }
    }
}

/// Entries of the `STEER_STATS` array.
pub const STATS_ENTRIES: u32 = MAX_SLOTS * reason::COUNT;

const _: () = assert!(size_of::<SteerRule>() == 48);
const _: () = assert!(size_of::<SteerMeta>() == 16);
