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
//!
//! The `sk_lookup` program that steers connections to listeners is in
//! [`steer`].
//!
//! This file parses frames; the address verdicts are in [`v4`] and [`v6`]
//! (host maps, then the prefix indexes of `sentinel_common::prefix`), the
//! maps in [`maps`], and what the lookups share in [`lookup`].
#![no_std]
#![no_main]
// `AtomicU64::fetch_add` is not offered for the BPF target; the intrinsic
// lowers to the BPF atomic add instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{mem::size_of, ptr};

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use sentinel_common::{proto, reason};

use maps::{PORT_POLICY, XDP_STATS};

mod lookup;
mod maps;
mod steer;
mod v4;
mod v6;

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

/// What the address verdicts return when no list decides. A plain `u32`
/// rather than an `Option`: a BPF subprogram returning an aggregate hands
/// back a pointer to the caller's stack, which the verifier refuses.
pub(crate) const NO_VERDICT: u32 = u32::MAX;

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
    let why = v4::v4_verdict([hdr[12], hdr[13], hdr[14], hdr[15]]);
    if why != NO_VERDICT {
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
    let hi = u64::from_be_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let lo = u64::from_be_bytes([
        hdr[16], hdr[17], hdr[18], hdr[19], hdr[20], hdr[21], hdr[22], hdr[23],
    ]);
    let why = v6::v6_verdict(hi, lo);
    if why != NO_VERDICT {
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
