//! IPv4 sources: the host maps, then the prefix indexes (a direct table,
//! a rules array and a long-prefix map; `sentinel_common::prefix`).

use core::ptr;

use aya_ebpf::maps::{Array, HashMap};
use sentinel_common::{
    populated,
    prefix::{LongKey4, PrefixRule4, direct, list},
    reason,
};

use crate::{
    NO_VERDICT,
    lookup::{clock, fls, host_match, meta, record_hit},
    maps::*,
};

/// Rules on a chain of parents: one per length, 0 to 32. An IPv4 lookup
/// follows parents past expired rules to the longest live one, however many
/// have expired and not yet been reaped.
const MAX_CHAIN: usize = 33;

/// The IPv4 prefix index of one list (see `sentinel_common::prefix`).
struct V4Index {
    direct: &'static Array<[u32; 256]>,
    rules: &'static Array<PrefixRule4>,
    long: &'static HashMap<LongKey4, u32>,
}

/// Allowlist, then denylist, for an IPv4 source. In each list the host map
/// comes first: a live host entry is the longest prefix there can be. An
/// expired one falls through to the prefixes, which may still cover the
/// address.
///
/// Inlined: the verifier takes it within its budget, and a subprogram's
/// call and return (through the return thunk of spectre mitigations) cost
/// a tenth of a miss on the machines measured.
#[inline(always)]
pub(crate) fn v4_verdict(octets: [u8; 4]) -> u32 {
    let addr = u32::from_be_bytes(octets);
    let (populated, allow_bits, deny_bits) = match meta() {
        // SAFETY: a non-null array lookup result points at the whole value.
        Some(m) => unsafe {
            (
                (*m).populated,
                (*m).v4[list::ALLOW].direct_bits,
                (*m).v4[list::DENY].direct_bits,
            )
        },
        None => (u32::MAX, 0, 0),
    };
    let mut now = 0u64;
    if populated & populated::ALLOW_HOST_V4 != 0 && host_match(&ALLOW_HOST_V4, &octets, &mut now) {
        return reason::ALLOWLIST;
    }
    let allow = V4Index {
        direct: &ALLOW_V4_DIRECT,
        rules: &ALLOW_V4_RULES,
        long: &ALLOW_V4_LONG,
    };
    if populated & populated::ALLOW_V4 != 0 && v4_prefix_match(&allow, allow_bits, addr, &mut now) {
        return reason::ALLOWLIST;
    }
    if populated & populated::DENY_HOST_V4 != 0 && host_match(&DENY_HOST_V4, &octets, &mut now) {
        return reason::DENYLIST;
    }
    let deny = V4Index {
        direct: &DENY_V4_DIRECT,
        rules: &DENY_V4_RULES,
        long: &DENY_V4_LONG,
    };
    if populated & populated::DENY_V4 != 0 && v4_prefix_match(&deny, deny_bits, addr, &mut now) {
        return reason::DENYLIST;
    }
    NO_VERDICT
}

/// The longest live IPv4 rule of `ix` covering `addr`; records the hit on
/// it. `bits`: the index's direct bits from `Meta`.
///
/// One slot read gives the longest rule of at most `bits` bits and which
/// longer lengths have rules in the slot's block; those lengths are probed,
/// longest first, in the long map. From the rule found, parents lead past
/// expired rules to shorter live ones.
#[inline(always)]
fn v4_prefix_match(ix: &V4Index, bits: u32, addr: u32, now: &mut u64) -> bool {
    if bits != direct::SMALL_BITS && bits != direct::LARGE_BITS {
        // Not written yet: the daemon writes it before the first rule.
        return false;
    }
    // The table is an array of 256-slot elements: the top `bits - 8` bits
    // pick the element, the next 8 the slot.
    let Some(element) = ix.direct.get_ptr(addr >> (40 - bits)) else {
        return false;
    };
    let inner = ((addr >> (32 - bits)) & 0xff) as usize;
    // SAFETY: `element` points at a whole 256-slot value and `inner` < 256.
    // The daemon stores slots with single aligned 32-bit writes.
    let slot = unsafe { ptr::read_volatile((element as *const u32).add(inner)) };
    let mut rule = direct::rule(slot, bits);
    let mut longer = direct::longer(slot, bits);
    // At most 15 longer lengths (/17 to /31 for a small table).
    for _ in 0..15 {
        if longer == 0 {
            break;
        }
        let j = fls(longer);
        longer &= !(1 << j);
        let len = bits + 1 + j;
        let key = LongKey4 {
            prefix_len: len,
            network: addr & direct::mask(len),
        };
        if let Some(found) = ix.long.get_ptr(key) {
            // SAFETY: a non-null hash lookup result points at the value.
            let found = unsafe { *found };
            if covers(ix.rules, found, addr) {
                rule = found;
                break;
            }
        }
    }
    live_in_chain(ix.rules, rule, addr, now)
}

/// Whether rule `index` is in use and covers `addr`. The daemon unlinks a
/// rule before it frees its element, and reuses elements oldest-freed
/// first, so a stale index seen mid-update is caught here rather than
/// matched.
#[inline(always)]
fn covers(rules: &Array<PrefixRule4>, index: u32, addr: u32) -> bool {
    let Some(rule) = rules.get_ptr(index) else {
        return false;
    };
    // SAFETY: a non-null array lookup result points at the whole value.
    unsafe { rule_covers(rule, addr) }
}

/// # Safety
///
/// `rule` points at a whole rules-array element.
#[inline(always)]
unsafe fn rule_covers(rule: *const PrefixRule4, addr: u32) -> bool {
    // SAFETY: upheld by the caller.
    let (in_use, len, network) = unsafe {
        (
            ptr::read_volatile(&raw const (*rule).in_use),
            (*rule).value.prefix_len,
            (*rule).network,
        )
    };
    in_use != 0 && len <= 32 && addr & direct::mask(len) == network
}

/// From rule `index`, the first live rule on its chain of parents; records
/// the hit on it.
#[inline(always)]
fn live_in_chain(rules: &Array<PrefixRule4>, mut index: u32, addr: u32, now: &mut u64) -> bool {
    for _ in 0..MAX_CHAIN {
        if index == 0 {
            return false;
        }
        let Some(rule) = rules.get_ptr_mut(index) else {
            return false;
        };
        // SAFETY: a non-null array lookup result points at the whole value.
        if !unsafe { rule_covers(rule, addr) } {
            return false;
        }
        // SAFETY: as above.
        let (expires, parent) = unsafe {
            (
                ptr::read_volatile(&raw const (*rule).value.expires_at_ns),
                ptr::read_volatile(&raw const (*rule).parent),
            )
        };
        let now = clock(now);
        if expires == 0 || now < expires {
            // SAFETY: as above; the value lies inside the element.
            record_hit(unsafe { &raw mut (*rule).value }, now);
            return true;
        }
        index = parent;
    }
    false
}
