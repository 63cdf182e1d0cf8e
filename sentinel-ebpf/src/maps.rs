//! The program's maps. Capacities are placeholders: the daemon sets them
//! from its configuration before loading (`EbpfLoader::map_max_entries`)
//! and pins the shared maps under its pin path. How the prefix indexes are
//! laid out is described in `sentinel_common::prefix`.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, SockMap},
};
use sentinel_common::{
    Counters, DEFAULT_ALLOW_V4_ENTRIES, DEFAULT_ALLOW_V6_ENTRIES, DEFAULT_DENY_V4_ENTRIES,
    DEFAULT_DENY_V6_ENTRIES, Meta, PORT_POLICY_ENTRIES, PortVerdict, RuleValue,
    prefix::{LongKey4, PrefixKey6, PrefixRule4, direct, filter},
    reason,
    steer::{self, DEFAULT_WATCH_ENTRIES, SteerMeta, SteerRule},
};

// Host entries (/32, /128) live in hash maps: one lookup, whatever their
// number. Hash maps are not preallocated, so a large capacity costs memory
// only as entries arrive. The direct tables, rules arrays and filters are
// arrays that the daemon writes through mmap (`BPF_F_MMAPABLE`), so that a
// bulk load costs memory stores rather than a syscall per slot; arrays are
// allocated whole when created.

/// A direct table of `SMALL_BITS`: 256 elements of 256 slots.
const SMALL_DIRECT: u32 = direct::elements(direct::SMALL_BITS);
/// A direct table of `LARGE_BITS`: 65,536 elements of 256 slots.
const LARGE_DIRECT: u32 = direct::elements(direct::LARGE_BITS);

#[map(name = "ALLOW_V4_DIRECT")]
pub(crate) static ALLOW_V4_DIRECT: Array<[u32; 256]> =
    Array::with_max_entries(SMALL_DIRECT, BPF_F_MMAPABLE);

#[map(name = "ALLOW_V4_RULES")]
pub(crate) static ALLOW_V4_RULES: Array<PrefixRule4> =
    Array::with_max_entries(DEFAULT_ALLOW_V4_ENTRIES + 1, BPF_F_MMAPABLE);

#[map(name = "ALLOW_V4_LONG")]
pub(crate) static ALLOW_V4_LONG: HashMap<LongKey4, u32> =
    HashMap::with_max_entries(DEFAULT_ALLOW_V4_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "ALLOW_V6_FILTER")]
pub(crate) static ALLOW_V6_FILTER: Array<[u32; 256]> = Array::with_max_entries(
    filter::elements(filter::bits_for(DEFAULT_ALLOW_V6_ENTRIES)),
    BPF_F_MMAPABLE,
);

#[map(name = "ALLOW_V6_PREFIX")]
pub(crate) static ALLOW_V6_PREFIX: HashMap<PrefixKey6, RuleValue> =
    HashMap::with_max_entries(DEFAULT_ALLOW_V6_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "ALLOW_HOST_V4")]
pub(crate) static ALLOW_HOST_V4: HashMap<[u8; 4], RuleValue> =
    HashMap::with_max_entries(DEFAULT_ALLOW_V4_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "ALLOW_HOST_V6")]
pub(crate) static ALLOW_HOST_V6: HashMap<[u8; 16], RuleValue> =
    HashMap::with_max_entries(DEFAULT_ALLOW_V6_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DENY_V4_DIRECT")]
pub(crate) static DENY_V4_DIRECT: Array<[u32; 256]> =
    Array::with_max_entries(LARGE_DIRECT, BPF_F_MMAPABLE);

#[map(name = "DENY_V4_RULES")]
pub(crate) static DENY_V4_RULES: Array<PrefixRule4> =
    Array::with_max_entries(DEFAULT_DENY_V4_ENTRIES + 1, BPF_F_MMAPABLE);

#[map(name = "DENY_V4_LONG")]
pub(crate) static DENY_V4_LONG: HashMap<LongKey4, u32> =
    HashMap::with_max_entries(DEFAULT_DENY_V4_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DENY_V6_FILTER")]
pub(crate) static DENY_V6_FILTER: Array<[u32; 256]> = Array::with_max_entries(
    filter::elements(filter::bits_for(DEFAULT_DENY_V6_ENTRIES)),
    BPF_F_MMAPABLE,
);

#[map(name = "DENY_V6_PREFIX")]
pub(crate) static DENY_V6_PREFIX: HashMap<PrefixKey6, RuleValue> =
    HashMap::with_max_entries(DEFAULT_DENY_V6_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DENY_HOST_V4")]
pub(crate) static DENY_HOST_V4: HashMap<[u8; 4], RuleValue> =
    HashMap::with_max_entries(DEFAULT_DENY_V4_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DENY_HOST_V6")]
pub(crate) static DENY_HOST_V6: HashMap<[u8; 16], RuleValue> =
    HashMap::with_max_entries(DEFAULT_DENY_V6_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "PORT_POLICY")]
pub(crate) static PORT_POLICY: Array<PortVerdict> = Array::with_max_entries(PORT_POLICY_ENTRIES, 0);

/// Written by userspace: the layout version of the pinned maps, which rule
/// maps hold entries (the program skips empty ones), and the shape of each
/// prefix index.
#[map(name = "SENTINEL_META")]
pub(crate) static SENTINEL_META: Array<Meta> = Array::with_max_entries(1, 0);

/// Per CPU: the jiffies count and the coarse clock read at it
/// (`lookup::clock`). Per program instance, never pinned.
#[map(name = "CLOCK_CACHE")]
pub(crate) static CLOCK_CACHE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "XDP_STATS")]
pub(crate) static XDP_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(reason::COUNT, 0);

// Steering (`steer.rs`). The watchlist is pinned with the other lists; the
// rest belongs to one daemon run. LPM tries are never preallocated (aya adds
// BPF_F_NO_PREALLOC, which the kernel requires for them).

#[map(name = "WATCH_V4")]
pub(crate) static WATCH_V4: LpmTrie<[u8; 4], RuleValue> =
    LpmTrie::with_max_entries(DEFAULT_WATCH_ENTRIES, 0);

#[map(name = "WATCH_V6")]
pub(crate) static WATCH_V6: LpmTrie<[u8; 16], RuleValue> =
    LpmTrie::with_max_entries(DEFAULT_WATCH_ENTRIES, 0);

#[map(name = "STEER_RULES")]
pub(crate) static STEER_RULES: Array<SteerRule> = Array::with_max_entries(steer::RULE_ENTRIES, 0);

#[map(name = "STEER_SOCKETS")]
pub(crate) static STEER_SOCKETS: SockMap = SockMap::with_max_entries(steer::MAX_SLOTS, 0);

#[map(name = "STEER_META")]
pub(crate) static STEER_META: Array<SteerMeta> = Array::with_max_entries(1, 0);

#[map(name = "STEER_STATS")]
pub(crate) static STEER_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(steer::STATS_ENTRIES, 0);
