//! Deterministic denylists for the benchmarks: the same seed gives the same
//! prefixes, addresses and packets on every run and machine.
//!
//! Prefix lengths follow the shape of published blocklists (mostly /24 and
//! longer for IPv4, /48 and /64 for IPv6, a few short prefixes); the exact
//! mix is written once, in [`V4_LENGTHS`] and [`V6_LENGTHS`].

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sentinel_tests::packet::Packet;

/// (prefix length, weight) of the IPv4 prefix lists.
pub const V4_LENGTHS: &[(u8, u32)] = &[
    (16, 1),
    (18, 2),
    (20, 4),
    (22, 8),
    (24, 50),
    (25, 5),
    (26, 10),
    (27, 5),
    (28, 15),
];

/// (prefix length, weight) of the IPv6 prefix lists.
pub const V6_LENGTHS: &[(u8, u32)] = &[(32, 5), (48, 25), (56, 10), (64, 40), (128, 20)];

/// Destination of every benchmark packet (never routed anywhere: the
/// frames only go through `BPF_PROG_TEST_RUN`).
const DST_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const DST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// What a list is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// IPv4 host addresses (/32).
    V4Host,
    /// IPv4 prefixes of mixed lengths ([`V4_LENGTHS`]).
    V4Prefix,
    /// IPv6 prefixes of mixed lengths ([`V6_LENGTHS`]).
    V6Prefix,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::V4Host, Kind::V4Prefix, Kind::V6Prefix];

    pub fn label(self) -> &'static str {
        match self {
            Kind::V4Host => "IPv4 /32",
            Kind::V4Prefix => "IPv4 /16-/28",
            Kind::V6Prefix => "IPv6 /32-/128",
        }
    }

    fn seed(self) -> u64 {
        match self {
            Kind::V4Host => 0x5e47_0001,
            Kind::V4Prefix => 0x5e47_0002,
            Kind::V6Prefix => 0x5e47_0003,
        }
    }

    pub fn is_v6(self) -> bool {
        self == Kind::V6Prefix
    }

    /// Prefix length of the entry the hit packet matches: the most common
    /// one of the kind, the same at every entry count, so that rows of
    /// different sizes compare like with like.
    pub fn hit_len(self) -> u8 {
        match self {
            Kind::V4Host => 32,
            Kind::V4Prefix => 24,
            Kind::V6Prefix => 64,
        }
    }
}

/// SplitMix64: small, fast and good enough to spread keys over a trie.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pick_len(&mut self, table: &[(u8, u32)]) -> u8 {
        let total: u32 = table.iter().map(|(_, w)| w).sum();
        let mut roll = (self.next_u64() % u64::from(total)) as u32;
        for &(len, weight) in table {
            if roll < weight {
                return len;
            }
            roll -= weight;
        }
        table[table.len() - 1].0
    }

    fn v4(&mut self) -> Ipv4Addr {
        Ipv4Addr::from(self.next_u64() as u32)
    }

    /// A global unicast address (2000::/3).
    fn v6(&mut self) -> Ipv6Addr {
        let hi = (self.next_u64() & !(0b111 << 61)) | (0b001 << 61);
        let lo = self.next_u64();
        Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo))
    }
}

/// A denylist and the packets that test it.
pub struct EntrySet {
    pub kind: Kind,
    /// Distinct prefixes, in generation order.
    pub prefixes: Vec<IpNet>,
    /// One address inside each prefix (the prefix itself for /32): what an
    /// exact-address filter such as xdp-filter is given instead.
    pub addresses: Vec<IpAddr>,
    /// A source inside one of the prefixes (of length [`Kind::hit_len`]),
    /// and present in `addresses`.
    pub hit: IpAddr,
    /// A source outside every prefix.
    pub miss: IpAddr,
}

impl EntrySet {
    /// `n` entries of `kind`.
    pub fn generate(kind: Kind, n: usize) -> Self {
        let mut rng = Rng::new(kind.seed() ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut seen = HashSet::with_capacity(n);
        let mut prefixes = Vec::with_capacity(n);
        let mut addresses = Vec::with_capacity(n);
        while prefixes.len() < n {
            let (prefix, inside) = match kind {
                Kind::V4Host => {
                    let a = rng.v4();
                    (IpNet::V4(Ipv4Net::from(a)), IpAddr::V4(a))
                }
                Kind::V4Prefix => {
                    let len = rng.pick_len(V4_LENGTHS);
                    let net = Ipv4Net::new(rng.v4(), len).unwrap_or_default().trunc();
                    let host = (rng.next_u64() as u32) & !u32::from(net.netmask());
                    let inside = Ipv4Addr::from(u32::from(net.network()) | host);
                    (IpNet::V4(net), IpAddr::V4(inside))
                }
                Kind::V6Prefix => {
                    let len = rng.pick_len(V6_LENGTHS);
                    let net = Ipv6Net::new(rng.v6(), len).unwrap_or_default().trunc();
                    let host = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()))
                        & !u128::from(net.netmask());
                    let inside = Ipv6Addr::from(u128::from(net.network()) | host);
                    (IpNet::V6(net), IpAddr::V6(inside))
                }
            };
            if seen.insert(prefix) {
                prefixes.push(prefix);
                addresses.push(inside);
            }
        }
        let hit_at = (n / 2..n)
            .chain(0..n / 2)
            .find(|&i| prefixes[i].prefix_len() == kind.hit_len())
            .unwrap_or(n / 2);
        let hit = addresses[hit_at];
        let lengths: Vec<u8> = match kind {
            Kind::V4Host => vec![32],
            Kind::V4Prefix => V4_LENGTHS.iter().map(|(l, _)| *l).collect(),
            Kind::V6Prefix => V6_LENGTHS.iter().map(|(l, _)| *l).collect(),
        };
        let covered = |addr: IpAddr| {
            lengths.iter().any(|&len| {
                IpNet::new(addr, len)
                    .map(|net| seen.contains(&net.trunc()))
                    .unwrap_or(false)
            })
        };
        let miss = loop {
            let candidate = if kind.is_v6() {
                IpAddr::V6(rng.v6())
            } else {
                IpAddr::V4(rng.v4())
            };
            if !covered(candidate) && candidate != dst(kind) {
                break candidate;
            }
        };
        Self {
            kind,
            prefixes,
            addresses,
            hit,
            miss,
        }
    }

    /// The UDP frame from `src` used for every measurement of this set.
    pub fn frame(&self, src: IpAddr) -> Vec<u8> {
        match (src, dst(self.kind)) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Packet::ipv4(s, d).udp(40_000, 53).build(),
            (IpAddr::V6(s), IpAddr::V6(d)) => Packet::ipv6(s, d).udp(40_000, 53).build(),
            // One family per set.
            (IpAddr::V4(s), IpAddr::V6(_)) => Packet::ipv4(s, DST_V4).udp(40_000, 53).build(),
            (IpAddr::V6(s), IpAddr::V4(_)) => Packet::ipv6(s, DST_V6).udp(40_000, 53).build(),
        }
    }
}

fn dst(kind: Kind) -> IpAddr {
    if kind.is_v6() {
        IpAddr::V6(DST_V6)
    } else {
        IpAddr::V4(DST_V4)
    }
}

/// `1k`, `100k`, `1M`.
pub fn count_label(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_deterministic_and_consistent() {
        for kind in Kind::ALL {
            let a = EntrySet::generate(kind, 2_000);
            let b = EntrySet::generate(kind, 2_000);
            assert_eq!(a.prefixes, b.prefixes);
            assert_eq!(a.prefixes.len(), 2_000);
            assert!(
                a.prefixes
                    .iter()
                    .zip(&a.addresses)
                    .all(|(p, x)| p.contains(x))
            );
            assert!(a.prefixes.iter().any(|p| p.contains(&a.hit)));
            assert!(
                a.prefixes
                    .iter()
                    .any(|p| p.prefix_len() == kind.hit_len() && p.contains(&a.hit))
            );
            assert!(!a.prefixes.iter().any(|p| p.contains(&a.miss)));
            assert!(a.prefixes.iter().all(|p| p.trunc() == *p));
        }
    }

    #[test]
    fn labels() {
        assert_eq!(count_label(1_000), "1k");
        assert_eq!(count_label(100_000), "100k");
        assert_eq!(count_label(1_000_000), "1M");
        assert_eq!(count_label(1_500), "1500");
    }
}
