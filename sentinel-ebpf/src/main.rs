//! Sentinel's XDP fast path.
//!
//! For every frame received on an attached interface, before the kernel
//! allocates a socket buffer, the program decides in this order:
//!
//! 1. the source address matches a live allowlist entry: pass;
//! 2. the source address matches a live denylist entry (longest prefix):
//!    drop;
//! 3. the destination port is denied for TCP or UDP: drop;
//! 4. otherwise: pass.
//!
//! Address verdicts are taken as soon as the network header is known to be
//! whole, so a denied source cannot slip through by truncating its transport
//! header or by fragmenting; non-first fragments carry no ports and are
//! decided on addresses alone. A frame whose headers are truncated or
//! malformed is never read past its end: it is counted as `malformed` and
//! passed to the stack, which drops what it cannot parse itself.
//!
//! Every verdict is counted per CPU by reason, in packets and bytes.
//!
//! Entry expiry and last-hit times are `CLOCK_MONOTONIC_COARSE`
//! nanoseconds (`bpf_ktime_get_coarse_ns`), which userspace reads with
//! `clock_gettime`.
#![no_std]
#![no_main]
// `AtomicU64::fetch_add` is not offered for the BPF target; the intrinsic
// lowers to the BPF atomic add instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{ffi::c_void, mem::size_of, ptr};

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    helpers::{bpf_ktime_get_coarse_ns, bpf_map_lookup_elem},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use sentinel_common::{
    Counters, DEFAULT_ALLOW_V4_ENTRIES, DEFAULT_ALLOW_V6_ENTRIES, DEFAULT_DENY_V4_ENTRIES,
    DEFAULT_DENY_V6_ENTRIES, Meta, PORT_POLICY_ENTRIES, PortVerdict, RuleValue, populated, proto,
    reason,
};

// Map capacities are placeholders: the daemon sets them from its
// configuration before loading (`EbpfLoader::map_max_entries`) and pins the
// shared maps under its pin path.
//
// Host entries (/32, /128) live in hash maps: one lookup, whatever their
// number. Shorter prefixes live in LPM tries, whose lookups walk a depth
// that grows with the number of prefixes. Hash maps are not preallocated,
// so a large capacity costs memory only as entries arrive.

#[map(name = "ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], RuleValue> =
    LpmTrie::with_max_entries(DEFAULT_ALLOW_V4_ENTRIES, 0);

#[map(name = "ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], RuleValue> =
    LpmTrie::with_max_entries(DEFAULT_ALLOW_V6_ENTRIES, 0);

#[map(name = "ALLOW_HOST_V4")]
static ALLOW_HOST_V4: HashMap<[u8; 4], RuleValue> =
    HashMap::with_max_entries(DEFAULT_ALLOW_V4_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "ALLOW_HOST_V6")]
static ALLOW_HOST_V6: HashMap<[u8; 16], RuleValue> =
    HashMap::with_max_entries(DEFAULT_ALLOW_V6_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DENY_HOST_V4")]
static DENY_HOST_V4: HashMap<[u8; 4], RuleValue> =
    HashMap::with_max_entries(DEFAULT_DENY_V4_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DENY_HOST_V6")]
static DENY_HOST_V6: HashMap<[u8; 16], RuleValue> =
    HashMap::with_max_entries(DEFAULT_DENY_V6_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DENY_V4")]
static DENY_V4: LpmTrie<[u8; 4], RuleValue> = LpmTrie::with_max_entries(DEFAULT_DENY_V4_ENTRIES, 0);

#[map(name = "DENY_V6")]
static DENY_V6: LpmTrie<[u8; 16], RuleValue> =
    LpmTrie::with_max_entries(DEFAULT_DENY_V6_ENTRIES, 0);

#[map(name = "PORT_POLICY")]
static PORT_POLICY: Array<PortVerdict> = Array::with_max_entries(PORT_POLICY_ENTRIES, 0);

/// Written by userspace: the layout version of the pinned maps, and which
/// rule maps hold entries (the program skips empty ones).
#[map(name = "SENTINEL_META")]
static SENTINEL_META: Array<Meta> = Array::with_max_entries(1, 0);

#[map(name = "XDP_STATS")]
static XDP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(reason::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
/// 802.1Q and QinQ: two tags at most.
const MAX_VLAN_TAGS: usize = 2;

const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers walked before giving up (counted as malformed).
const MAX_IPV6_EXT_HEADERS: usize = 8;

const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// Expired entries looked past in one lookup. Each expired entry that
/// shadows a shorter prefix costs one more trie lookup until userspace reaps
/// it (within one reap interval).
const MAX_EXPIRED_SHADOWS: usize = 8;

#[xdp]
pub fn sentinel_xdp(ctx: XdpContext) -> u32 {
    let pkt = Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let why = classify(&pkt);
    count(why, (pkt.end - pkt.start) as u64);
    match why {
        reason::DENYLIST | reason::PORT => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// Bounds-checked view of the frame.
struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    /// Reads a `T` at `offset`, or `None` when the frame is too short. The
    /// comparison against `end` is what the verifier needs to see before
    /// any packet read.
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: `at..at + size_of::<T>()` lies inside the frame (checked
        // above); packet data has no alignment guarantee, hence unaligned.
        Some(unsafe { ptr::read_unaligned(at as *const T) })
    }

    #[inline(always)]
    fn has(&self, offset: usize, len: usize) -> bool {
        self.start + offset + len <= self.end
    }
}

#[inline(always)]
fn classify(pkt: &Packet) -> u32 {
    let Some(ethertype) = pkt.load::<[u8; 2]>(12) else {
        return reason::MALFORMED;
    };
    let mut ethertype = u16::from_be_bytes(ethertype);
    let mut l3 = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // The tag is TCI (2 bytes) then the encapsulated ethertype.
        let Some(inner) = pkt.load::<[u8; 2]>(l3 + 2) else {
            return reason::MALFORMED;
        };
        ethertype = u16::from_be_bytes(inner);
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => ipv4(pkt, l3),
        ETH_P_IPV6 => ipv6(pkt, l3),
        // ARP, a third VLAN tag, anything else: not ours to judge.
        _ => reason::PASS,
    }
}

#[inline(always)]
fn ipv4(pkt: &Packet, l3: usize) -> u32 {
    let Some(hdr) = pkt.load::<[u8; IPV4_MIN_HLEN]>(l3) else {
        return reason::MALFORMED;
    };
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if hdr[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return reason::MALFORMED;
    }
    let src = [hdr[12], hdr[13], hdr[14], hdr[15]];
    let lists = Lists {
        allow_host: &ALLOW_HOST_V4,
        allow: &ALLOW_V4,
        deny_host: &DENY_HOST_V4,
        deny: &DENY_V4,
        bits: [
            populated::ALLOW_HOST_V4,
            populated::ALLOW_V4,
            populated::DENY_HOST_V4,
            populated::DENY_V4,
        ],
    };
    if let Some(why) = address_verdict(&lists, src, 32) {
        return why;
    }
    // Non-first fragments carry no transport header.
    let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    if frag_offset != 0 {
        return reason::PASS;
    }
    // Options, if any, lie between the fixed header and `l3 + ihl`; the
    // transport read below checks that they are all there.
    transport(pkt, l3 + ihl, hdr[9])
}

#[inline(always)]
fn ipv6(pkt: &Packet, l3: usize) -> u32 {
    let Some(hdr) = pkt.load::<[u8; IPV6_HLEN]>(l3) else {
        return reason::MALFORMED;
    };
    if hdr[0] >> 4 != 6 {
        return reason::MALFORMED;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let lists = Lists {
        allow_host: &ALLOW_HOST_V6,
        allow: &ALLOW_V6,
        deny_host: &DENY_HOST_V6,
        deny: &DENY_V6,
        bits: [
            populated::ALLOW_HOST_V6,
            populated::ALLOW_V6,
            populated::DENY_HOST_V6,
            populated::DENY_V6,
        ],
    };
    if let Some(why) = address_verdict(&lists, src, 128) {
        return why;
    }

    let mut next = hdr[6];
    let mut off = l3 + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP | IPPROTO_UDP => return transport(pkt, off, next),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                // RFC 8200 4.3-4.6: next header, length in 8-octet units
                // not counting the first 8 octets.
                let Some(ext) = pkt.load::<[u8; 2]>(off) else {
                    return reason::MALFORMED;
                };
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                // RFC 8200 4.5: fixed 8 octets; offset in the top 13 bits.
                let Some(frag) = pkt.load::<[u8; 4]>(off) else {
                    return reason::MALFORMED;
                };
                if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8 != 0 {
                    return reason::PASS;
                }
                next = frag[0];
                off += 8;
            }
            IPPROTO_AH => {
                // RFC 4302 2.2: length in 4-octet units, minus 2.
                let Some(ext) = pkt.load::<[u8; 2]>(off) else {
                    return reason::MALFORMED;
                };
                next = ext[0];
                off += (ext[1] as usize + 2) * 4;
            }
            // ICMPv6, ESP, no next header, others: no ports to judge.
            _ => return reason::PASS,
        }
    }
    reason::MALFORMED
}

#[inline(always)]
fn transport(pkt: &Packet, l4: usize, protocol: u8) -> u32 {
    let (block, hlen) = match protocol {
        IPPROTO_TCP => (proto::TCP, TCP_MIN_HLEN),
        IPPROTO_UDP => (proto::UDP, UDP_HLEN),
        _ => return reason::PASS,
    };
    if !pkt.has(l4, hlen) {
        return reason::MALFORMED;
    }
    let Some(ports) = pkt.load::<[u8; 4]>(l4) else {
        return reason::MALFORMED;
    };
    let dport = u16::from_be_bytes([ports[2], ports[3]]) as u32;
    match PORT_POLICY.get(block * 65_536 + dport) {
        Some(denied) if *denied != 0 => reason::PORT,
        _ => reason::PASS,
    }
}

/// The four maps of one address family.
struct Lists<K: 'static> {
    allow_host: &'static HashMap<K, RuleValue>,
    allow: &'static LpmTrie<K, RuleValue>,
    deny_host: &'static HashMap<K, RuleValue>,
    deny: &'static LpmTrie<K, RuleValue>,
    /// `populated` bits of the four maps, in the order above.
    bits: [u32; 4],
}

/// Allowlist, then denylist, for a source address of `bits` bits. In each
/// list the host map comes first: a live host entry is the longest prefix
/// there can be. An expired one falls through to the prefixes, which may
/// still cover the address.
#[inline(always)]
fn address_verdict<K: Copy>(lists: &Lists<K>, addr: K, bits: u32) -> Option<u32> {
    // An array lookup the JIT inlines; without the entry (never, once the
    // daemon has started) every map is looked up.
    let populated = SENTINEL_META.get(0).map_or(u32::MAX, |m| m.populated);
    let mut now = 0u64;
    if populated & lists.bits[0] != 0 && host_match(lists.allow_host, &addr, &mut now) {
        return Some(reason::ALLOWLIST);
    }
    if populated & lists.bits[1] != 0 && live_match(lists.allow, addr, bits, &mut now) {
        return Some(reason::ALLOWLIST);
    }
    if populated & lists.bits[2] != 0 && host_match(lists.deny_host, &addr, &mut now) {
        return Some(reason::DENYLIST);
    }
    if populated & lists.bits[3] != 0 && live_match(lists.deny, addr, bits, &mut now) {
        return Some(reason::DENYLIST);
    }
    None
}

/// Reads the clock once per packet, on the first entry found.
///
/// `CLOCK_MONOTONIC_COARSE`: the last tick's time, a few loads with no
/// clock-source read (the TSC read behind the precise clocks costs more
/// than the rest of a hit). Its resolution, a tick (1-4 ms), is far below
/// any TTL; it does not count time the machine spends suspended.
#[inline(always)]
fn clock(now: &mut u64) -> u64 {
    if *now == 0 {
        // SAFETY: helper without arguments.
        *now = unsafe { bpf_ktime_get_coarse_ns() };
    }
    *now
}

/// A live host entry for `addr`; records the hit on it.
#[inline(always)]
fn host_match<K>(map: &HashMap<K, RuleValue>, addr: &K, now: &mut u64) -> bool {
    // SAFETY: `map` is a map definition relocated by the loader, and `addr`
    // is a valid key on the stack for the duration of the call.
    let value = unsafe {
        bpf_map_lookup_elem(
            map as *const _ as *mut c_void,
            addr as *const K as *const c_void,
        )
    } as *mut RuleValue;
    if value.is_null() {
        return false;
    }
    // SAFETY: a non-null lookup result points at a live value (RCU keeps it
    // valid for this program run).
    let expires = unsafe { (*value).expires_at_ns };
    let now = clock(now);
    if expires == 0 || now < expires {
        record_hit(value, now);
        return true;
    }
    false
}

/// Longest live (unexpired) prefix containing `addr`; records the hit on it.
///
/// An LPM lookup returns only the longest matching prefix. When that entry
/// has expired, a shorter live prefix may still cover the address, so the
/// lookup is repeated with the key's prefix length just below the expired
/// entry's: the trie then only considers prefixes up to that length.
#[inline(always)]
fn live_match<K: Copy>(map: &LpmTrie<K, RuleValue>, addr: K, bits: u32, now: &mut u64) -> bool {
    let mut key = Key::new(bits, addr);
    for _ in 0..MAX_EXPIRED_SHADOWS {
        // SAFETY: `map` is a map definition relocated by the loader, and
        // `key` is a valid `Key<K>` on the stack for the duration of the call.
        let value = unsafe {
            bpf_map_lookup_elem(
                map as *const _ as *mut c_void,
                &key as *const Key<K> as *const c_void,
            )
        } as *mut RuleValue;
        if value.is_null() {
            return false;
        }
        // SAFETY: a non-null lookup result points at a live value of the
        // map's value size (RCU keeps it valid for this program run).
        let (expires, prefix_len) = unsafe { ((*value).expires_at_ns, (*value).prefix_len) };
        let now = clock(now);
        if expires == 0 || now < expires {
            record_hit(value, now);
            return true;
        }
        if prefix_len == 0 || prefix_len > bits {
            return false;
        }
        key.prefix_len = prefix_len - 1;
    }
    false
}

#[inline(always)]
fn record_hit(value: *mut RuleValue, now: u64) {
    // SAFETY: `value` is a non-null map value pointer (see `live_match`);
    // map values are 8-byte aligned, as an atomic add requires. The hit count
    // is shared by all CPUs, hence the atomic add; the last-hit time is a
    // plain store, where any recent writer is good enough, made once per
    // clock tick so that a flood does not write the line on every packet.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*value).hits, 1);
        if ptr::read_volatile(&raw const (*value).last_hit_ns) != now {
            ptr::write_volatile(&raw mut (*value).last_hit_ns, now);
        }
    }
}

#[inline(always)]
fn count(why: u32, bytes: u64) {
    if let Some(counters) = XDP_STATS.get_ptr_mut(why) {
        // SAFETY: per-CPU slot of this CPU; XDP runs with preemption
        // disabled, so no other writer can interleave.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that
    // could panic, because it would have no exit.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
