//! What every lookup shares: the metadata, the clock, host entries and
//! hit records, and bit scans.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr,
};

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_map_lookup_elem},
    maps::HashMap,
};
use sentinel_common::{Meta, RuleValue};

use crate::maps::{CLOCK_CACHE, SENTINEL_META};

/// `SENTINEL_META`: an array lookup the JIT inlines. Without the entry
/// (never, once the daemon has started) nothing is known to be empty.
#[inline(always)]
pub(crate) fn meta() -> Option<*const Meta> {
    SENTINEL_META.get_ptr(0)
}

/// Index of the highest set bit of `x` (`x` non-zero).
///
/// Branch-free on purpose: BPF has no count-leading-zeros instruction, and
/// a compare-and-shift version forks the verifier's state at every compare
/// of every loop iteration that calls it. Smearing the top bit down and
/// counting the ones takes about twenty ALU instructions and no branch.
#[inline(always)]
pub(crate) fn fls(x: u32) -> u32 {
    let mut x = x;
    x |= x >> 1;
    x |= x >> 2;
    x |= x >> 4;
    x |= x >> 8;
    x |= x >> 16;
    x -= (x >> 1) & 0x5555_5555;
    x = (x & 0x3333_3333) + ((x >> 2) & 0x3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101) >> 24).wrapping_sub(1) & 31
}

/// Index of the highest set bit of `x` (`x` non-zero); branch-free, as
/// [`fls`].
#[inline(always)]
pub(crate) fn fls64(x: u64) -> u32 {
    let mut x = x;
    x |= x >> 1;
    x |= x >> 2;
    x |= x >> 4;
    x |= x >> 8;
    x |= x >> 16;
    x |= x >> 32;
    x -= (x >> 1) & 0x5555_5555_5555_5555;
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    ((x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32).wrapping_sub(1) & 63
}

/// Reads the clock once per packet, on the first entry found.
///
/// `CLOCK_MONOTONIC_COARSE`: the last tick's time. Its resolution, a tick
/// (1-4 ms), is far below any TTL; it does not count time the machine
/// spends suspended. The coarse clock moves only at a tick, so each CPU
/// keeps the value it read with the jiffies count it read it at
/// (`CLOCK_CACHE`) and calls the helper again only once jiffies has moved:
/// `bpf_jiffies64` is a single load the verifier inlines on 64-bit JITs,
/// while a helper call and its return (through the return thunk of
/// spectre mitigations, on the machines measured) cost about a quarter of
/// a whole denylist hit. A cached value can be up to a tick behind (a read
/// that raced the tick's clock update), which the resolution already
/// allows.
#[inline(always)]
pub(crate) fn clock(now: &mut u64) -> u64 {
    if *now == 0 {
        *now = cached_clock();
    }
    *now
}

#[inline(always)]
fn cached_clock() -> u64 {
    // SAFETY: helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK_CACHE.get_ptr_mut(0) else {
        // SAFETY: as below.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption
    // disabled, so nothing else writes it meanwhile.
    unsafe {
        let [at, ns] = *cache;
        if at == jiffies && ns != 0 {
            return ns;
        }
        // SAFETY: helper without arguments.
        let ns = bpf_ktime_get_coarse_ns();
        *cache = [jiffies, ns];
        ns
    }
}

/// A live host entry for `addr`; records the hit on it.
#[inline(always)]
pub(crate) fn host_match<K>(map: &HashMap<K, RuleValue>, addr: &K, now: &mut u64) -> bool {
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

#[inline(always)]
pub(crate) fn record_hit(value: *mut RuleValue, now: u64) {
    // SAFETY: `value` is a non-null map value pointer (see the callers);
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
