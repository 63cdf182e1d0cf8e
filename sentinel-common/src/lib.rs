//! Types shared between the XDP program (`sentinel-ebpf`) and the daemon
//! (`sentinel-user`).
//!
//! Everything here is `#[repr(C)]`, `Copy`, built from fixed-width integers
//! and byte arrays with explicit padding, because the kernel and userspace
//! exchange these values as raw bytes through BPF maps. A change to any of
//! them is a change to the pinned map layout and must bump
//! [`LAYOUT_VERSION`], so that a daemon never reinterprets maps pinned by an
//! incompatible build.
#![no_std]

use core::mem::size_of;

/// Version of the layout of every pinned map. Stored in the `SENTINEL_META`
/// map; a daemon refuses to reuse pinned maps that carry another version.
///
/// 3: prefixes moved from LPM tries to the prefix indexes of [`prefix`].
pub const LAYOUT_VERSION: u32 = 3;

pub mod prefix;
pub mod steer;

/// Names of the maps in the eBPF object. Userspace pins the shared ones under
/// the configured pin path with these names (kernel map names are at most
/// 15 characters).
///
/// Each list is, per family, a hash map of hosts (/32, /128), found in one
/// lookup whatever their number, and a prefix index for shorter prefixes
/// ([`prefix`]): for IPv4 a direct table indexed by the address's top bits,
/// an array of rules and a hash map of the lengths the table does not
/// resolve; for IPv6 a filter indexed by a hash of the top 32 bits and a
/// hash map keyed by (length, network).
pub mod maps {
    pub const ALLOW_V4_DIRECT: &str = "ALLOW_V4_DIRECT";
    pub const ALLOW_V4_RULES: &str = "ALLOW_V4_RULES";
    pub const ALLOW_V4_LONG: &str = "ALLOW_V4_LONG";
    pub const ALLOW_V6_FILTER: &str = "ALLOW_V6_FILTER";
    pub const ALLOW_V6_PREFIX: &str = "ALLOW_V6_PREFIX";
    /// Allowlist /32 hosts (hash).
    pub const ALLOW_HOST_V4: &str = "ALLOW_HOST_V4";
    /// Allowlist /128 hosts (hash).
    pub const ALLOW_HOST_V6: &str = "ALLOW_HOST_V6";
    pub const DENY_V4_DIRECT: &str = "DENY_V4_DIRECT";
    pub const DENY_V4_RULES: &str = "DENY_V4_RULES";
    pub const DENY_V4_LONG: &str = "DENY_V4_LONG";
    pub const DENY_V6_FILTER: &str = "DENY_V6_FILTER";
    pub const DENY_V6_PREFIX: &str = "DENY_V6_PREFIX";
    pub const DENY_HOST_V4: &str = "DENY_HOST_V4";
    pub const DENY_HOST_V6: &str = "DENY_HOST_V6";
    pub const PORT_POLICY: &str = "PORT_POLICY";
    /// Watchlist of suspect sources (LPM tries), read by the `sk_lookup`
    /// program ([`crate::steer`]).
    pub const WATCH_V4: &str = "WATCH_V4";
    pub const WATCH_V6: &str = "WATCH_V6";
    /// Steering rules, listener sockets, metadata and counters of the
    /// `sk_lookup` program: owned by one daemon run, never pinned (a pinned
    /// socket map would keep a stopped daemon's listeners alive).
    pub const STEER_RULES: &str = "STEER_RULES";
    pub const STEER_SOCKETS: &str = "STEER_SOCKETS";
    pub const STEER_META: &str = "STEER_META";
    pub const STEER_STATS: &str = "STEER_STATS";
    pub const META: &str = "SENTINEL_META";
    /// Per-CPU counters; one instance per attached interface, never pinned.
    pub const STATS: &str = "XDP_STATS";

    /// Maps shared by every program instance and kept across restarts.
    pub const PINNED: [&str; 18] = [
        ALLOW_V4_DIRECT,
        ALLOW_V4_RULES,
        ALLOW_V4_LONG,
        ALLOW_V6_FILTER,
        ALLOW_V6_PREFIX,
        ALLOW_HOST_V4,
        ALLOW_HOST_V6,
        DENY_V4_DIRECT,
        DENY_V4_RULES,
        DENY_V4_LONG,
        DENY_V6_FILTER,
        DENY_V6_PREFIX,
        DENY_HOST_V4,
        DENY_HOST_V6,
        PORT_POLICY,
        META,
        WATCH_V4,
        WATCH_V6,
    ];
}

/// Bits of [`Meta::populated`]: which rule maps hold entries. The program
/// skips the lookups of empty maps; userspace sets a bit after the first
/// entry is written and clears it after the last is removed. The `*_V4` and
/// `*_V6` bits stand for a list's whole prefix index.
pub mod populated {
    pub const ALLOW_V4: u32 = 1 << 0;
    pub const ALLOW_V6: u32 = 1 << 1;
    pub const ALLOW_HOST_V4: u32 = 1 << 2;
    pub const ALLOW_HOST_V6: u32 = 1 << 3;
    pub const DENY_V4: u32 = 1 << 4;
    pub const DENY_V6: u32 = 1 << 5;
    pub const DENY_HOST_V4: u32 = 1 << 6;
    pub const DENY_HOST_V6: u32 = 1 << 7;
}

/// Default capacities; the daemon overrides them from the `kernel` block.
pub const DEFAULT_DENY_V4_ENTRIES: u32 = 1_048_576;
pub const DEFAULT_DENY_V6_ENTRIES: u32 = 1_048_576;
pub const DEFAULT_ALLOW_V4_ENTRIES: u32 = 65_536;
pub const DEFAULT_ALLOW_V6_ENTRIES: u32 = 65_536;

/// Why the program decided what it did. Index into the `XDP_STATS` per-CPU
/// array; the action follows from the reason.
pub mod reason {
    /// Source matched the allowlist: passed without further checks.
    pub const ALLOWLIST: u32 = 0;
    /// Source matched a live denylist entry: dropped.
    pub const DENYLIST: u32 = 1;
    /// Destination port denied by the port policy: dropped.
    pub const PORT: u32 = 2;
    /// Nothing matched: passed.
    pub const PASS: u32 = 3;
    /// Truncated or malformed headers: passed to the stack, which will make
    /// its own decision, and counted.
    pub const MALFORMED: u32 = 4;
    /// Number of reasons; size of the stats array.
    pub const COUNT: u32 = 5;

    /// Label used in metrics and the CLI.
    pub const fn name(reason: u32) -> &'static str {
        match reason {
            ALLOWLIST => "allowlist",
            DENYLIST => "denylist",
            PORT => "port",
            PASS => "pass",
            MALFORMED => "malformed",
            _ => "unknown",
        }
    }

    /// `"drop"` or `"pass"`.
    pub const fn action(reason: u32) -> &'static str {
        match reason {
            DENYLIST | PORT => "drop",
            _ => "pass",
        }
    }
}

/// Index of a protocol's block in `PORT_POLICY`: entry `proto * 65536 + port`.
pub mod proto {
    pub const TCP: u32 = 0;
    pub const UDP: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Number of entries of the `PORT_POLICY` array.
pub const PORT_POLICY_ENTRIES: u32 = proto::COUNT * 65_536;

/// Value of `PORT_POLICY`: non-zero denies the port.
pub type PortVerdict = u8;

/// Per-CPU packet and byte counter for one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Length of the `source` field of a rule: who added it ("config", "admin",
/// "agent:<name>"). Longer text is truncated on a UTF-8 boundary.
pub const SOURCE_LEN: usize = 32;
/// Length of the `reason` field of a rule. Longer text is truncated on a
/// UTF-8 boundary.
pub const REASON_LEN: usize = 64;

/// Value of every allowlist and denylist entry, host or prefix.
///
/// The program reads `expires_at_ns` and `prefix_len` and updates `hits` and
/// `last_hit_ns` in place; the rest is for operators and survives restarts
/// with the entry. IPv4 prefixes carry it inside a [`prefix::PrefixRule4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds (`bpf_ktime_get_coarse_ns`) at
    /// which the entry stops matching; 0 means never.
    pub expires_at_ns: u64,
    /// Packets that matched this entry (atomic add in the program).
    pub hits: u64,
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds of the last match, to the tick;
    /// 0 means never.
    pub last_hit_ns: u64,
    /// Wall-clock seconds since the Unix epoch when the entry was written.
    pub created_at_unix_s: u64,
    /// Prefix length of the entry.
    pub prefix_len: u32,
    pub _pad: u32,
    /// NUL-padded UTF-8.
    pub source: [u8; SOURCE_LEN],
    /// NUL-padded UTF-8.
    pub reason: [u8; REASON_LEN],
}

impl RuleValue {
    pub const fn zeroed() -> Self {
        Self {
            expires_at_ns: 0,
            hits: 0,
            last_hit_ns: 0,
            created_at_unix_s: 0,
            prefix_len: 0,
            _pad: 0,
            source: [0; SOURCE_LEN],
            reason: [0; REASON_LEN],
        }
    }

    /// Whether the entry has expired at `now_ns` (`CLOCK_MONOTONIC_COARSE`).
    #[inline(always)]
    pub const fn is_expired(&self, now_ns: u64) -> bool {
        self.expires_at_ns != 0 && now_ns >= self.expires_at_ns
    }
}

/// Value of the one-entry `SENTINEL_META` array, read once per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// [`LAYOUT_VERSION`] of the build that created the pinned maps.
    pub layout_version: u32,
    /// [`populated`] bits: which rule maps hold entries.
    pub populated: u32,
    /// Per list ([`prefix::list`]): its IPv4 prefix index.
    pub v4: [prefix::Prefix4Meta; prefix::list::COUNT],
    /// Per list ([`prefix::list`]): its IPv6 prefix index.
    pub v6: [prefix::Prefix6Meta; prefix::list::COUNT],
}

// The kernel sees these as raw bytes: pin their sizes so that an accidental
// change fails the build instead of corrupting pinned maps.
const _: () = assert!(size_of::<Counters>() == 16);
const _: () = assert!(size_of::<RuleValue>() == 40 + SOURCE_LEN + REASON_LEN);
const _: () = assert!(
    size_of::<Meta>()
        == 8 + prefix::list::COUNT
            * (size_of::<prefix::Prefix4Meta>() + size_of::<prefix::Prefix6Meta>())
);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: these types are `repr(C)`, contain only integers and byte arrays,
    // have explicit padding fields, and every bit pattern is valid.
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::Meta {}
    unsafe impl aya::Pod for super::prefix::PrefixRule4 {}
    unsafe impl aya::Pod for super::prefix::LongKey4 {}
    unsafe impl aya::Pod for super::prefix::PrefixKey6 {}
    unsafe impl aya::Pod for super::steer::SteerRule {}
    unsafe impl aya::Pod for super::steer::SteerMeta {}
}
