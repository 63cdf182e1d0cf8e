//! The prefix indexes: how the daemon lays out a list's prefixes so that the
//! program finds the longest live one in a few lookups whatever the number
//! of entries.
//!
//! The program reads these structures and the daemon writes them; both use
//! the constants and functions below, so that they agree by construction.
//! Host entries (/32, /128) are not here: they live in hash maps of their
//! own (`*_HOST_V4`, `*_HOST_V6`).
//!
//! **IPv4: a direct table and an array of rules.** The direct table has one
//! 32-bit slot per block of the top `bits` bits of the address ([`direct`];
//! `bits` is 24 for a large list, 16 for a small one). A slot holds the index
//! of the longest rule of at most `bits` bits covering the block, and a bit
//! per longer length (up to /31) for which some rule lies inside the block.
//! Rules live in an array ([`PrefixRule4`]) that carries their value, their
//! network and the index of their parent: the next shorter rule covering
//! them. A rule longer than `bits` is found through a hash map keyed by
//! (length, network) ([`LongKey4`]), probed only for the lengths the slot
//! names. An expired rule does not match: the program follows parents to the
//! longest live rule that covers the address. Short prefixes are expanded
//! into every slot they cover, so a lookup costs one slot read, rarely a
//! probe, and one rule read.
//!
//! **IPv6: a filter and a hash map of prefixes.** The filter has one 32-bit
//! slot per value of a hash of the address's top 32 bits ([`filter`]). A
//! slot has a bit per class of prefix lengths (/32 to /127, lengths 31
//! apart sharing a class) for which a prefix whose top 32 bits hash there
//! exists, and a bit for hosts (/128) whose top 32 bits hash there, which
//! gates the host map lookup. The prefixes live in a hash map keyed by
//! (length, network) ([`PrefixKey6`]); the program probes, longest first,
//! only the lengths that both the slot's classes and the list
//! ([`Prefix6Meta::lengths`]) have, and the lengths shorter than /32 the
//! list has ([`Prefix6Meta::always`]).
//! A miss usually costs one slot read; a hit, one probe.
//!
//! Every list that has prefixes gets both indexes; a new list (a watchlist,
//! say) adds an entry to [`list`] and its own maps, and reuses the rest.

use crate::RuleValue;

/// Lists with prefix indexes: positions in [`crate::Meta::v4`] and
/// [`crate::Meta::v6`].
pub mod list {
    pub const ALLOW: usize = 0;
    pub const DENY: usize = 1;
    pub const COUNT: usize = 2;
}

/// The IPv4 direct table.
pub mod direct {
    /// Slots per element of the table's array map: an element is 1 KiB, so
    /// the array has no per-element padding (the kernel rounds array
    /// elements up to 8 bytes) and is one flat table of slots.
    pub const SLOTS_PER_ELEMENT: u32 = 256;
    /// Top bits indexing the table of a small list: 65,536 slots, 256 KiB.
    pub const SMALL_BITS: u32 = 16;
    /// Top bits indexing the table of a large list: 16,777,216 slots, 64 MiB.
    pub const LARGE_BITS: u32 = 24;

    /// The largest rule index a table indexed by `bits` bits can hold:
    /// a slot spends `bits + 1` bits on it and one bit on each length from
    /// `bits + 1` to 31.
    pub const fn max_rules(bits: u32) -> u32 {
        (1 << (bits + 1)) - 1
    }

    /// The table a list of `capacity` rules gets: the small one whenever its
    /// slots can index that many rules.
    pub const fn bits_for(capacity: u32) -> u32 {
        if capacity <= max_rules(SMALL_BITS) {
            SMALL_BITS
        } else {
            LARGE_BITS
        }
    }

    /// Elements of the table's array map for `bits`.
    pub const fn elements(bits: u32) -> u32 {
        1 << (bits - 8)
    }

    /// The rule index in a slot (0: no rule of at most `bits` bits).
    pub const fn rule(slot: u32, bits: u32) -> u32 {
        slot & max_rules(bits)
    }

    /// The longer lengths of a slot: bit `j` set when a rule of length
    /// `bits + 1 + j` lies inside the slot's block.
    pub const fn longer(slot: u32, bits: u32) -> u32 {
        slot >> (bits + 1)
    }

    /// A slot from its parts.
    pub const fn slot(rule: u32, longer: u32, bits: u32) -> u32 {
        rule | (longer << (bits + 1))
    }

    /// The slot of `addr` (host byte order).
    pub const fn slot_of(addr: u32, bits: u32) -> u32 {
        addr >> (32 - bits)
    }

    /// The netmask of a `len`-bit prefix, `len` at most 32.
    pub const fn mask(len: u32) -> u32 {
        (u64::MAX << (32 - len)) as u32
    }
}

/// The IPv6 filter.
pub mod filter {
    /// Slots per element of the filter's array map (see
    /// [`super::direct::SLOTS_PER_ELEMENT`]).
    pub const SLOTS_PER_ELEMENT: u32 = 256;
    /// Set in a slot when a host (/128) of the list has a top 32 bits that
    /// hash to it.
    pub const HOST: u32 = 1 << 31;
    /// Set in a slot whose prefixes (from /32) all have one length: bits 0
    /// to 6 are then that length, and the slot names exactly one probe.
    /// Clear: bits 0 to 29 are classes of lengths.
    pub const EXACT: u32 = 1 << 30;
    /// The length of an [`EXACT`] slot.
    pub const LENGTH: u32 = 0x7f;
    /// Classes of prefix lengths: bits 0 to 29 of a slot without [`EXACT`].
    pub const CLASSES: u32 = 30;
    /// A slot naming every length and the host bit: what a reader that
    /// cannot trust the filter (not sized yet) must assume. Not all bits
    /// set, which would read as [`EXACT`].
    pub const ALL: u32 = HOST | ((1 << CLASSES) - 1);
    /// The shortest length the filter describes; shorter prefixes are
    /// probed for every address ([`super::Prefix6Meta::always`]).
    pub const FIRST_LEN: u32 = 32;
    /// Fewest and most index bits of a filter.
    pub const MIN_BITS: u32 = 16;
    pub const MAX_BITS: u32 = 24;

    /// The class of a length from 32 to 127: lengths 30 apart share one
    /// (32, 62, 92 and 122 are class 0; 64, 94 and 124 class 2; ...), so
    /// that the lengths a slot's classes stand for are the slot's bits
    /// shifted to four places ([`spread`]), with no loop.
    pub const fn class_of(len: u32) -> u32 {
        (len - FIRST_LEN) % CLASSES
    }

    /// Every length (as a 128-bit mask, `[0-63, 64-127]`) of the classes
    /// set in `classes` (bits 0 to 29): the class bits moved to lengths
    /// 32, 62, 92 and 122 and up.
    pub const fn spread(classes: u32) -> [u64; 2] {
        let c = (classes & ((1 << CLASSES) - 1)) as u64;
        [(c << 32) | (c << 62), (c >> 2) | (c << 28) | (c << 58)]
    }

    /// The lengths (as [`spread`] gives them) that the prefix part of a
    /// slot names: its one length when [`EXACT`], else its classes'
    /// lengths. The host bit names none. Branch-free but for the one test
    /// of [`EXACT`].
    pub const fn lengths_of(slot: u32) -> [u64; 2] {
        if slot & EXACT == 0 {
            return spread(slot);
        }
        let len = slot & LENGTH;
        let bit = 1u64 << (len & 63);
        let upper = (len >> 6) as u64;
        [bit & upper.wrapping_sub(1), bit & upper.wrapping_neg()]
    }

    /// A slot's value once a prefix length `len` (32 to 127) that no
    /// prefix of the slot had yet is added: a slot without prefixes
    /// becomes [`EXACT`] for `len`; a second length turns it into classes.
    /// The host bit is kept. The result depends only on the set of
    /// lengths added, not their order, so a slot can be rebuilt by folding
    /// its lengths in any order.
    pub const fn with_length(slot: u32, len: u32) -> u32 {
        let part = slot & !HOST;
        let part = if part == 0 {
            EXACT | len
        } else if part & EXACT != 0 {
            if part & LENGTH == len {
                part
            } else {
                (1 << class_of(part & LENGTH)) | (1 << class_of(len))
            }
        } else {
            part | (1 << class_of(len))
        };
        (slot & HOST) | part
    }

    /// Index bits of the filter of a list of `capacity` entries: about
    /// eight slots per entry, so that an address outside every prefix
    /// finds a clear slot nearly always.
    pub const fn bits_for(capacity: u32) -> u32 {
        let mut bits = MIN_BITS;
        while bits < MAX_BITS && (1u64 << bits) < (capacity as u64) * 8 {
            bits += 1;
        }
        bits
    }

    /// Elements of the filter's array map for `bits`.
    pub const fn elements(bits: u32) -> u32 {
        1 << (bits - 8)
    }

    /// The slot of an address whose top 32 bits are `top` (host byte
    /// order): Fibonacci hashing, whose high bits mix all of `top`.
    pub const fn slot_of(top: u32, bits: u32) -> u32 {
        top.wrapping_mul(0x9e37_79b1) >> (32 - bits)
    }

    /// The mask of the first `len` bits of a 64-bit half, `len` at most 64.
    /// Two shifts of at most 32 each, so that neither 0 nor 64 needs a
    /// branch (which would fork the verifier's state in the probe loop).
    pub const fn mask64(len: u32) -> u64 {
        !((u64::MAX >> (len / 2)) >> (len - len / 2))
    }
}

/// An element of an IPv4 rules array (`*_V4_RULES`).
///
/// Element 0 is never a rule (index 0 means "none" everywhere); its
/// `parent` field records how many indexes have ever been handed out, so
/// that a restart reads only that far.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixRule4 {
    /// `value.prefix_len` is the rule's length. The program reads the
    /// expiry and updates the hit count and last-hit time in place.
    pub value: RuleValue,
    /// The network, host byte order (`u32::from_be_bytes` of its octets).
    pub network: u32,
    /// Index of the longest rule strictly covering this one; 0: none.
    pub parent: u32,
    /// Non-zero while the element holds a rule. Written last when a rule
    /// is added and first when it is removed.
    pub in_use: u32,
    pub _pad: u32,
}

impl PrefixRule4 {
    pub const fn zeroed() -> Self {
        Self {
            value: RuleValue::zeroed(),
            network: 0,
            parent: 0,
            in_use: 0,
            _pad: 0,
        }
    }
}

/// Key of an IPv4 long-prefix map (`*_V4_LONG`); the value is a rule index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LongKey4 {
    pub prefix_len: u32,
    /// Host byte order, masked to `prefix_len`.
    pub network: u32,
}

/// Key of an IPv6 prefix map (`*_V6_PREFIX`); the value is a
/// [`RuleValue`].
///
/// The length is folded into the address: the key is the network, masked
/// to its length, with the first bit past the prefix set (bit `127 - len`
/// counting from the least significant). That is one key per (length,
/// network) for lengths 0 to 127, in 16 bytes rather than 20, so a probe
/// hashes and compares four words.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixKey6 {
    /// The marked network's 16 octets as four words, each holding four
    /// octets in network order (`u32::from_ne_bytes`), so that the program
    /// builds a key with four word stores.
    pub marked: [u32; 4],
}

impl PrefixKey6 {
    /// The key of the `len`-bit prefix (`len` < 128) whose network, as a
    /// number, is `network` (already masked).
    pub const fn new(len: u32, network: u128) -> Self {
        let marked = network | (1u128 << (127 - len));
        let hi = (marked >> 64) as u64;
        let lo = marked as u64;
        Self {
            marked: [
                ((hi >> 32) as u32).to_be(),
                (hi as u32).to_be(),
                ((lo >> 32) as u32).to_be(),
                (lo as u32).to_be(),
            ],
        }
    }

    const fn value(&self) -> u128 {
        let [a, b, c, d] = self.marked;
        ((u32::from_be(a) as u128) << 96)
            | ((u32::from_be(b) as u128) << 64)
            | ((u32::from_be(c) as u128) << 32)
            | u32::from_be(d) as u128
    }

    /// The prefix length; `None` for a key with no marker bit.
    pub const fn prefix_len(&self) -> Option<u32> {
        let value = self.value();
        if value == 0 {
            None
        } else {
            Some(127 - value.trailing_zeros())
        }
    }

    /// The network, as a number: the key without its marker bit.
    pub const fn network(&self) -> u128 {
        let value = self.value();
        value & value.wrapping_sub(1)
    }
}

/// What the program needs to know about a list's IPv4 index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix4Meta {
    /// Top bits indexing its direct table ([`direct::SMALL_BITS`] or
    /// [`direct::LARGE_BITS`]); 0 until the daemon has written it, and then
    /// the index is not looked up.
    pub direct_bits: u32,
    pub _pad: u32,
}

/// What the program needs to know about a list's IPv6 index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix6Meta {
    /// Index bits of its filter; 0 until the daemon has written it, and
    /// then every class is probed.
    pub filter_bits: u32,
    pub _pad: u32,
    /// Lengths probed for every address whatever its filter slot, as a
    /// 128-bit mask (bit `len` of `[0-63, 64-127]`): the list's lengths
    /// under /32, which the filter cannot describe.
    pub always: [u64; 2],
    /// The list's lengths from /32 to /127, same mask: what the lengths of
    /// a slot's lengths ([`filter::lengths_of`]) are narrowed to.
    pub lengths: [u64; 2],
}

const _: () = assert!(core::mem::size_of::<PrefixRule4>() == 136 + 16);
const _: () = assert!(core::mem::size_of::<PrefixRule4>().is_multiple_of(8));
const _: () = assert!(core::mem::size_of::<LongKey4>() == 8);
const _: () = assert!(core::mem::size_of::<PrefixKey6>() == 16);
const _: () = assert!(core::mem::size_of::<Prefix4Meta>() == 8);
const _: () = assert!(core::mem::size_of::<Prefix6Meta>() == 40);
const _: () = assert!(direct::max_rules(direct::LARGE_BITS) >= 16 * 1024 * 1024);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_slots_round_trip() {
        for bits in [direct::SMALL_BITS, direct::LARGE_BITS] {
            let rule = direct::max_rules(bits);
            let longer = (1 << (31 - bits)) - 1;
            let slot = direct::slot(rule, longer, bits);
            assert_eq!(direct::rule(slot, bits), rule);
            assert_eq!(direct::longer(slot, bits), longer);
            assert_eq!(direct::slot(0, 0, bits), 0);
        }
        assert_eq!(direct::bits_for(65_536), 16);
        assert_eq!(direct::bits_for(131_071), 16);
        assert_eq!(direct::bits_for(131_072), 24);
        assert_eq!(direct::mask(0), 0);
        assert_eq!(direct::mask(24), 0xffff_ff00);
        assert_eq!(direct::mask(32), u32::MAX);
    }

    #[test]
    fn ipv6_keys_mark_the_length_and_hold_octets_in_network_order() {
        let network = 0x2001_0db8_0001_0002_0000_0000_0000_0000u128;
        let key = PrefixKey6::new(64, network);
        assert_eq!((key.prefix_len(), key.network()), (Some(64), network));
        let mut bytes = [0u8; 16];
        for (i, word) in key.marked.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        assert_eq!(bytes, (network | 1 << 63).to_be_bytes());
        // Every (length, network) has its own key, /0 and /127 included.
        assert_eq!(PrefixKey6::new(0, 0).prefix_len(), Some(0));
        assert_eq!(PrefixKey6::new(127, u128::MAX - 1).prefix_len(), Some(127));
        assert_eq!(PrefixKey6::new(127, u128::MAX - 1).network(), u128::MAX - 1);
        assert_ne!(PrefixKey6::new(47, network), PrefixKey6::new(48, network));
        assert_eq!(PrefixKey6 { marked: [0; 4] }.prefix_len(), None);
    }

    #[test]
    fn spread_gives_exactly_the_lengths_of_each_class() {
        for class in 0..filter::CLASSES {
            let [low, high] = filter::spread(1 << class);
            let mask = u128::from(low) | (u128::from(high) << 64);
            let want = (filter::FIRST_LEN..128)
                .filter(|len| filter::class_of(*len) == class)
                .fold(0u128, |m, len| m | 1 << len);
            assert_eq!(mask, want, "class {class}");
        }
        assert_eq!(
            filter::spread(filter::HOST | filter::EXACT),
            [0, 0],
            "the host and exact bits are no classes"
        );
        assert_eq!(
            wide(filter::lengths_of(filter::ALL & !filter::HOST)),
            u128::MAX << filter::FIRST_LEN,
            "ALL names every length from /32"
        );
        assert_eq!(filter::class_of(32), 0);
        assert_eq!(filter::class_of(122), 0);
        assert_eq!(filter::class_of(127), 5);
    }

    fn wide(m: [u64; 2]) -> u128 {
        u128::from(m[0]) | (u128::from(m[1]) << 64)
    }

    #[test]
    fn a_slot_of_one_length_names_only_that_length() {
        for len in filter::FIRST_LEN..128 {
            let slot = filter::with_length(0, len);
            assert_eq!(slot, filter::EXACT | len);
            assert_eq!(wide(filter::lengths_of(slot)), 1 << len, "/{len}");
            let host = filter::with_length(filter::HOST, len);
            assert_eq!(host, filter::HOST | filter::EXACT | len);
            assert_eq!(wide(filter::lengths_of(host & !filter::HOST)), 1 << len);
            assert_eq!(
                filter::with_length(slot, len),
                slot,
                "the same length again"
            );
        }
    }

    #[test]
    fn slots_of_several_lengths_name_at_least_those_in_any_order() {
        let sets: [&[u32]; 4] = [
            &[64, 48],
            &[32, 62, 92, 122],
            &[127, 33, 64, 100, 101],
            &[96, 126],
        ];
        for set in sets {
            let mut want = 0u128;
            let mut forward = 0;
            for &len in set {
                forward = filter::with_length(forward, len);
                want |= 1 << len;
            }
            let backward = set.iter().rev().fold(0, |s, &l| filter::with_length(s, l));
            assert_eq!(forward, backward, "{set:?}");
            assert_eq!(forward & filter::EXACT, 0, "{set:?}");
            let named = wide(filter::lengths_of(forward));
            assert_eq!(named & want, want, "{set:?}: every length is named");
            // Only the lengths of the set's classes.
            let classes = (filter::FIRST_LEN..128)
                .filter(|l| {
                    set.iter()
                        .any(|s| filter::class_of(*s) == filter::class_of(*l))
                })
                .fold(0u128, |m, l| m | 1 << l);
            assert_eq!(named, classes, "{set:?}");
        }
    }

    #[test]
    fn filter_sizes() {
        assert_eq!(filter::bits_for(1), 16);
        assert_eq!(filter::bits_for(1 << 20), 23);
        assert_eq!(filter::bits_for(u32::MAX), 24);
        assert!(filter::slot_of(u32::MAX, 24) < 1 << 24);
        assert_eq!(filter::mask64(0), 0);
        assert_eq!(filter::mask64(1), 1 << 63);
        assert_eq!(filter::mask64(63), u64::MAX - 1);
        assert_eq!(filter::mask64(64), u64::MAX);
    }
}
