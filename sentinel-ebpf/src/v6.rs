//! IPv6 sources: the host maps, gated by the filter, then the prefix
//! indexes (a filter and a prefix map; `sentinel_common::prefix`).

use core::{
    ffi::{c_long, c_void},
    ptr,
};

use aya_ebpf::{
    helpers::bpf_loop,
    maps::{Array, HashMap},
};
use sentinel_common::{
    Meta, RuleValue, populated,
    prefix::{Prefix6Meta, PrefixKey6, filter, list},
    reason,
};

use crate::{
    NO_VERDICT,
    lookup::{clock, fls64, host_match, meta, record_hit},
    maps::*,
};

/// The IPv6 maps of one list: hosts and the prefix index. A type rather
/// than a struct of references, because the `bpf_loop` callback that
/// probes the prefix map must name its map statically.
trait V6Maps {
    /// Position in `Meta::v6`.
    const LIST: usize;
    /// `populated` bits of the host map and of the prefix index.
    const HOST_BIT: u32;
    const PREFIX_BIT: u32;
    fn host() -> &'static HashMap<[u8; 16], RuleValue>;
    fn filter() -> &'static Array<[u32; 256]>;
    fn prefixes() -> &'static HashMap<PrefixKey6, RuleValue>;
}

struct AllowV6;

impl V6Maps for AllowV6 {
    const LIST: usize = list::ALLOW;
    const HOST_BIT: u32 = populated::ALLOW_HOST_V6;
    const PREFIX_BIT: u32 = populated::ALLOW_V6;
    #[inline(always)]
    fn host() -> &'static HashMap<[u8; 16], RuleValue> {
        &ALLOW_HOST_V6
    }
    #[inline(always)]
    fn filter() -> &'static Array<[u32; 256]> {
        &ALLOW_V6_FILTER
    }
    #[inline(always)]
    fn prefixes() -> &'static HashMap<PrefixKey6, RuleValue> {
        &ALLOW_V6_PREFIX
    }
}

struct DenyV6;

impl V6Maps for DenyV6 {
    const LIST: usize = list::DENY;
    const HOST_BIT: u32 = populated::DENY_HOST_V6;
    const PREFIX_BIT: u32 = populated::DENY_V6;
    #[inline(always)]
    fn host() -> &'static HashMap<[u8; 16], RuleValue> {
        &DENY_HOST_V6
    }
    #[inline(always)]
    fn filter() -> &'static Array<[u32; 256]> {
        &DENY_V6_FILTER
    }
    #[inline(always)]
    fn prefixes() -> &'static HashMap<PrefixKey6, RuleValue> {
        &DENY_V6_PREFIX
    }
}

/// An IPv6 address as the host maps key it: its 16 octets, aligned so
/// that the two halves are two 8-byte stores.
#[repr(C, align(8))]
struct HostKey6([u8; 16]);

impl HostKey6 {
    #[inline(always)]
    fn new(hi: u64, lo: u64) -> Self {
        let (h, l) = (hi.to_be_bytes(), lo.to_be_bytes());
        Self([
            h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5],
            l[6], l[7],
        ])
    }
}

/// Allowlist, then denylist, for an IPv6 source (`hi`, `lo`: its two
/// halves, host byte order); hosts before prefixes as for IPv4. Each
/// list's filter slot is read once and gates both. Inlined, as
/// `v4_verdict`.
#[inline(always)]
pub(crate) fn v6_verdict(hi: u64, lo: u64) -> u32 {
    let Some(m) = meta() else {
        // No metadata: nothing says which lengths exist; only hosts can be
        // looked up without it.
        let host = HostKey6::new(hi, lo);
        let mut now = 0u64;
        if host_match(&ALLOW_HOST_V6, &host.0, &mut now) {
            return reason::ALLOWLIST;
        }
        if host_match(&DENY_HOST_V6, &host.0, &mut now) {
            return reason::DENYLIST;
        }
        return NO_VERDICT;
    };
    // SAFETY: a non-null array lookup result points at the whole value.
    let populated = unsafe { (*m).populated };
    let mut now = 0u64;
    if v6_list_match::<AllowV6>(m, populated, hi, lo, &mut now) {
        return reason::ALLOWLIST;
    }
    if v6_list_match::<DenyV6>(m, populated, hi, lo, &mut now) {
        return reason::DENYLIST;
    }
    NO_VERDICT
}

/// Hosts, then prefixes, of one IPv6 list.
#[inline(always)]
fn v6_list_match<M: V6Maps>(
    m: *const Meta,
    populated: u32,
    hi: u64,
    lo: u64,
    now: &mut u64,
) -> bool {
    if populated & (M::HOST_BIT | M::PREFIX_BIT) == 0 {
        return false;
    }
    // SAFETY: `m` points at the whole `SENTINEL_META` value.
    let meta = unsafe { &raw const (*m).v6[M::LIST] };
    // SAFETY: as above.
    let bits = unsafe { (*meta).filter_bits };
    let slot = filter_slot(M::filter(), bits, (hi >> 32) as u32);
    // The host key is built only when the slot says a host may match.
    if populated & M::HOST_BIT != 0
        && slot & filter::HOST != 0
        && host_match(M::host(), &HostKey6::new(hi, lo).0, now)
    {
        return true;
    }
    populated & M::PREFIX_BIT != 0 && v6_prefix_match::<M>(meta, slot, hi, lo, now)
}

/// The filter slot of an address with top 32 bits `top`; [`filter::ALL`]
/// when the filter's size is not known yet, so that nothing is skipped.
#[inline(always)]
fn filter_slot(map: &Array<[u32; 256]>, bits: u32, top: u32) -> u32 {
    if !(filter::MIN_BITS..=filter::MAX_BITS).contains(&bits) {
        return filter::ALL;
    }
    let slot = filter::slot_of(top, bits);
    let Some(element) = map.get_ptr(slot >> 8) else {
        return filter::ALL;
    };
    // SAFETY: `element` points at a whole 256-slot value; the index is < 256.
    unsafe { ptr::read_volatile((element as *const u32).add((slot & 0xff) as usize)) }
}

/// The longest live IPv6 prefix covering the address (`hi`, `lo`); records
/// the hit on it.
///
/// The candidate lengths, as a 128-bit mask, are the lengths the slot names
/// that the list has (the slot's one length, or the lengths of its
/// classes), and the lengths under /32 the list has: a few shifts and
/// masks. Then one probe per candidate, longest first; an
/// expired prefix does not stop the search. The first probe (nearly always
/// the only one) runs inline; any others run under `bpf_loop`: as a plain
/// loop, the verifier would walk all 128 iterations of it for every state
/// it can start from, which for two lists goes past its million-instruction
/// budget, while a `bpf_loop` callback is verified until its state
/// converges. The verifier inlines `bpf_loop` with a known callback into a
/// loop of direct calls.
#[inline(always)]
fn v6_prefix_match<M: V6Maps>(
    meta: *const Prefix6Meta,
    slot: u32,
    hi: u64,
    lo: u64,
    now: &mut u64,
) -> bool {
    // SAFETY: `meta` points inside the `SENTINEL_META` value.
    let (lengths, always) = unsafe { ((*meta).lengths, (*meta).always) };
    let part = slot & !filter::HOST;
    if part & filter::EXACT != 0 && always == [0, 0] {
        // The common case, one length and nothing shorter than /32: that
        // length is the only candidate, probed without the search.
        let len = part & filter::LENGTH;
        let [low, high] = filter::lengths_of(part);
        if (low & lengths[0]) | (high & lengths[1]) == 0 {
            return false;
        }
        let (key_hi, key_lo) = if len >= 64 {
            marked_low(hi, lo, len - 64)
        } else {
            marked_high(hi, len)
        };
        return probe6(M::prefixes(), key_hi, key_lo, now);
    }
    let [named_low, named_high] = filter::lengths_of(part);
    let mut search = Search {
        hi,
        lo,
        high: (named_high & lengths[1]) | always[1],
        low: (named_low & lengths[0]) | always[0],
        now: *now,
        found: 0,
    };
    if search.probe_next::<M>() == 0 {
        // SAFETY: `probe_step::<M>` has the callback signature `bpf_loop`
        // expects, and `search` outlives the call; the helper passes it
        // back as the callback's context. One iteration per candidate
        // length at most.
        unsafe {
            bpf_loop(
                128,
                probe_step::<M> as *const () as *mut c_void,
                &raw mut search as *mut c_void,
                0,
            );
        }
    }
    *now = search.now;
    search.found != 0
}

/// One IPv6 prefix search, shared with [`probe_step`] through `bpf_loop`.
#[repr(C)]
struct Search {
    /// The address, in two halves.
    hi: u64,
    lo: u64,
    /// Candidate lengths not probed yet: 64-127, 0-63.
    high: u64,
    low: u64,
    /// The clock as [`clock`] keeps it.
    now: u64,
    /// Non-zero once a live prefix matched.
    found: u64,
}

impl Search {
    /// Probes the longest candidate length left: 1 when the search is over
    /// (a live match, recorded in `found`, or no candidate left), else 0.
    #[inline(always)]
    fn probe_next<M: V6Maps>(&mut self) -> c_long {
        // The masks come from the branch that knows which half the length
        // is in, rather than from testing the length again.
        // The key is the network with the bit just past the prefix set
        // (`PrefixKey6`): for a length of 64 + b, the lower half masked to
        // b bits and marked at bit 63 - b; for a length of b, the upper
        // half likewise and no lower half.
        let (hi, lo) = if self.high != 0 {
            let bit = fls64(self.high);
            self.high &= !(1 << bit);
            marked_low(self.hi, self.lo, bit)
        } else if self.low != 0 {
            let bit = fls64(self.low);
            self.low &= !(1 << bit);
            marked_high(self.hi, bit)
        } else {
            return 1;
        };
        if probe6(M::prefixes(), hi, lo, &mut self.now) {
            self.found = 1;
            return 1;
        }
        0
    }
}

/// The key halves (`PrefixKey6`) of the prefix of length 64 + `bit` of the
/// address (`hi`, `lo`): the lower half masked to `bit` bits and marked at
/// bit 63 - `bit` (`bit` < 64).
#[inline(always)]
fn marked_low(hi: u64, lo: u64, bit: u32) -> (u64, u64) {
    (hi, (lo & filter::mask64(bit)) | (1 << (63 - bit)))
}

/// The key halves of the prefix of length `bit` (< 64) of an address whose
/// upper half is `hi`: that half masked and marked likewise, no lower half.
#[inline(always)]
fn marked_high(hi: u64, bit: u32) -> (u64, u64) {
    ((hi & filter::mask64(bit)) | (1 << (63 - bit)), 0)
}

/// `bpf_loop` callback: [`Search::probe_next`]; its 1 stops the loop.
extern "C" fn probe_step<M: V6Maps>(_index: u64, ctx: *mut c_void) -> c_long {
    let search = ctx as *mut Search;
    // SAFETY: `bpf_loop` passes back the context `v6_prefix_match` gave
    // it: a `Search` on that function's stack, alive for the whole loop.
    unsafe { (*search).probe_next::<M>() }
}

/// Whether the prefix whose key (`PrefixKey6`, marked network) is (`hi`,
/// `lo`) is in `map` and live; records the hit on it.
#[inline(always)]
fn probe6(map: &HashMap<PrefixKey6, RuleValue>, hi: u64, lo: u64, now: &mut u64) -> bool {
    let key = PrefixKey6 {
        marked: [
            ((hi >> 32) as u32).to_be(),
            (hi as u32).to_be(),
            ((lo >> 32) as u32).to_be(),
            (lo as u32).to_be(),
        ],
    };
    let Some(value) = map.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a non-null hash lookup result points at a live value (RCU
    // keeps it valid for this program run).
    let expires = unsafe { ptr::read_volatile(&raw const (*value).expires_at_ns) };
    let now = clock(now);
    if expires == 0 || now < expires {
        record_hit(value, now);
        return true;
    }
    false
}
