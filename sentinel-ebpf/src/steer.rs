//! The `sk_lookup` program: which listening socket a new connection lands
//! on (`sentinel_common::steer`).
//!
//! The kernel runs it for a TCP SYN or a UDP datagram addressed to this
//! host, before its own lookup of a listening or bound socket
//! (`BPF_SK_LOOKUP`, `inet_lookup_run_sk_lookup`). Returning `SK_PASS`
//! without assigning a socket lets that own lookup go ahead unchanged; the
//! program never returns `SK_DROP`, so it can only redirect what a rule
//! names, never lose a connection.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::sk_action, helpers::bpf_map_lookup_elem, macros::sk_lookup, maps::lpm_trie::Key,
    programs::SkLookupContext,
};
use sentinel_common::{
    RuleValue,
    steer::{AF_INET, AF_INET6, MAX_RULES, MAX_SLOTS, NO_SLOT, SteerMeta, reason, watch_populated},
};

use crate::{
    lookup::record_hit,
    maps::{STEER_META, STEER_RULES, STEER_SOCKETS, STEER_STATS, WATCH_V4, WATCH_V6},
};

/// What the kernel tells the program about the connection, copied out of
/// the context once.
struct Lookup {
    family: u32,
    protocol: u32,
    /// Destination address, as the kernel stores it (IPv4: word 0).
    local: [u32; 4],
    /// Source address bytes.
    remote: [u32; 4],
    /// Destination port, host order.
    local_port: u32,
}

#[sk_lookup]
pub fn sentinel_steer(ctx: SkLookupContext) -> u32 {
    let sk = ctx.lookup;
    // The verifier allows only loads at a constant offset from the context
    // pointer itself (no copies of whole arrays, which LLVM lowers through
    // a derived pointer): one volatile load per field.
    macro_rules! field {
        ($($path:tt)+) => {
            // SAFETY: `sk` is the kernel's `bpf_sk_lookup`, valid for the
            // run; every sk_lookup program may read these fields.
            unsafe { ptr::read_volatile(&raw const (*sk).$($path)+) }
        };
    }
    let family = field!(family);
    let (local, remote) = if family == AF_INET6 {
        (
            [
                field!(local_ip6[0]),
                field!(local_ip6[1]),
                field!(local_ip6[2]),
                field!(local_ip6[3]),
            ],
            [
                field!(remote_ip6[0]),
                field!(remote_ip6[1]),
                field!(remote_ip6[2]),
                field!(remote_ip6[3]),
            ],
        )
    } else {
        ([field!(local_ip4), 0, 0, 0], [field!(remote_ip4), 0, 0, 0])
    };
    let lookup = Lookup {
        family,
        protocol: field!(protocol),
        local,
        remote,
        local_port: field!(local_port),
    };
    if lookup.family != AF_INET && lookup.family != AF_INET6 {
        return sk_action::SK_PASS;
    }
    let Some(meta) = STEER_META.get(0) else {
        return sk_action::SK_PASS;
    };
    let meta: SteerMeta = *meta;
    let slot = find_rule(&meta, &lookup);
    if slot == NO_SLOT {
        return sk_action::SK_PASS;
    }
    let (slot, why) = if meta.quarantine < MAX_SLOTS && watchlisted(&meta, &lookup) {
        (meta.quarantine, reason::WATCHLIST)
    } else {
        (slot, reason::RULE)
    };
    if STEER_SOCKETS.redirect_sk_lookup(&ctx, slot, 0).is_ok() {
        count(slot, why);
    } else {
        // An empty slot (the daemon is between removing and adding a
        // socket) or a socket the kernel will not take for this protocol:
        // the normal lookup decides.
        count(slot, reason::NO_SOCKET);
    }
    sk_action::SK_PASS
}

/// The slot of the first rule of the active bank that matches, or
/// `NO_SLOT`.
#[inline(always)]
fn find_rule(meta: &SteerMeta, l: &Lookup) -> u32 {
    let base = meta.bank() * MAX_RULES;
    let rules = meta.rules();
    for i in 0..MAX_RULES {
        if i >= rules {
            break;
        }
        let Some(rule) = STEER_RULES.get(base + i) else {
            break;
        };
        if rule.family != l.family
            || rule.protocol != l.protocol
            || l.local_port < u32::from(rule.port_lo)
            || l.local_port > u32::from(rule.port_hi)
        {
            continue;
        }
        if l.local[0] & rule.mask[0] == rule.addr[0]
            && l.local[1] & rule.mask[1] == rule.addr[1]
            && l.local[2] & rule.mask[2] == rule.addr[2]
            && l.local[3] & rule.mask[3] == rule.addr[3]
        {
            return rule.slot;
        }
    }
    NO_SLOT
}

/// Whether the source matches a live watchlist entry; records the hit.
/// An expired entry never matches (it waits for the daemon to reap it).
#[inline(always)]
fn watchlisted(meta: &SteerMeta, l: &Lookup) -> bool {
    let value = if l.family == AF_INET {
        if meta.populated & watch_populated::V4 == 0 {
            return false;
        }
        let key = Key::new(32, l.remote[0].to_ne_bytes());
        // SAFETY: `WATCH_V4` is a map definition relocated by the loader and
        // `key` a valid `bpf_lpm_trie_key` on the stack for the call.
        unsafe {
            bpf_map_lookup_elem(
                &WATCH_V4 as *const _ as *mut c_void,
                &key as *const _ as *const c_void,
            )
        }
    } else {
        if meta.populated & watch_populated::V6 == 0 {
            return false;
        }
        let r = l.remote;
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&r[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&r[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&r[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&r[3].to_ne_bytes());
        let key = Key::new(128, addr);
        // SAFETY: as above, for `WATCH_V6`.
        unsafe {
            bpf_map_lookup_elem(
                &WATCH_V6 as *const _ as *mut c_void,
                &key as *const _ as *const c_void,
            )
        }
    } as *mut RuleValue;
    if value.is_null() {
        return false;
    }
    let mut now = 0u64;
    let now = crate::lookup::clock(&mut now);
    // SAFETY: a non-null lookup result points at a live value (RCU keeps it
    // valid for this program run).
    if unsafe { (*value).is_expired(now) } {
        return false;
    }
    record_hit(value, now);
    true
}

#[inline(always)]
fn count(slot: u32, why: u32) {
    if slot >= MAX_SLOTS {
        return;
    }
    if let Some(counter) = STEER_STATS.get_ptr_mut(slot * reason::COUNT + why) {
        // SAFETY: this CPU's slot of a per-CPU array; sk_lookup runs with
        // preemption disabled (under RCU), so no other writer interleaves.
        unsafe { *counter += 1 };
    }
}
