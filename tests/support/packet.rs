//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`: IPv4 (with options and
//! fragments) and IPv6 (with extension headers), over up to two VLAN tags,
//! carrying TCP, UDP or any other protocol.
//!
//! ```
//! use sentinel_tests::packet::Packet;
//! let frame = Packet::ipv4([192, 0, 2, 1], [198, 51, 100, 1]).tcp(40000, 443).build();
//! assert_eq!(frame.len(), 14 + 20 + 20);
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_ARP: u16 = 0x0806;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// IPv6 extension headers.
#[derive(Debug, Clone, Copy)]
pub enum Ext {
    /// Hop-by-hop options, `len8` 8-octet units beyond the first.
    HopByHop {
        len8: u8,
    },
    Routing {
        len8: u8,
    },
    DestOpts {
        len8: u8,
    },
    /// Fragment header; `offset` in 8-octet units.
    Fragment {
        offset: u16,
        more: bool,
    },
    /// Authentication header, `len4` per RFC 4302 (4-octet units minus 2).
    Auth {
        len4: u8,
    },
}

impl Ext {
    fn protocol(self) -> u8 {
        match self {
            Ext::HopByHop { .. } => 0,
            Ext::Routing { .. } => 43,
            Ext::Fragment { .. } => 44,
            Ext::Auth { .. } => 51,
            Ext::DestOpts { .. } => 60,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop { len8 } | Ext::Routing { len8 } | Ext::DestOpts { len8 } => {
                let mut b = vec![0u8; (usize::from(len8) + 1) * 8];
                b[0] = next;
                b[1] = len8;
                b
            }
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(more);
                let mut b = vec![next, 0, 0, 0, 0, 0, 0, 1];
                b[2..4].copy_from_slice(&field.to_be_bytes());
                b
            }
            Ext::Auth { len4 } => {
                let mut b = vec![0u8; (usize::from(len4) + 2) * 4];
                b[0] = next;
                b[1] = len4;
                b
            }
        }
    }
}

#[derive(Debug, Clone)]
enum L3 {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        /// Options in 4-byte words (IHL = 5 + words).
        option_words: u8,
        frag_offset: u16,
        more_fragments: bool,
        /// Overrides the version/IHL byte (malformed headers).
        version_ihl: Option<u8>,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ext: Vec<Ext>,
        version: u8,
    },
    Raw(u16),
}

/// A frame under construction.
#[derive(Debug, Clone)]
pub struct Packet {
    vlans: Vec<u16>,
    l3: L3,
    protocol: u8,
    l4: Vec<u8>,
    payload: usize,
}

impl Packet {
    pub fn ipv4(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>) -> Self {
        Self::new(L3::V4 {
            src: src.into(),
            dst: dst.into(),
            option_words: 0,
            frag_offset: 0,
            more_fragments: false,
            version_ihl: None,
        })
    }

    pub fn ipv6(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>) -> Self {
        Self::new(L3::V6 {
            src: src.into(),
            dst: dst.into(),
            ext: Vec::new(),
            version: 6,
        })
    }

    /// A frame of another ethertype (ARP, say) with `payload` zero bytes.
    pub fn ethertype(ethertype: u16) -> Self {
        Self::new(L3::Raw(ethertype))
    }

    fn new(l3: L3) -> Self {
        Self {
            vlans: Vec::new(),
            l3,
            protocol: IPPROTO_ICMP,
            l4: Vec::new(),
            payload: 0,
        }
    }

    /// Adds a VLAN tag (outermost first). `tpid` is 0x8100 or 0x88a8.
    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlans.push(tpid);
        self
    }

    /// IPv4 options, in 4-byte words (0-10).
    pub fn ipv4_options(mut self, words: u8) -> Self {
        if let L3::V4 { option_words, .. } = &mut self.l3 {
            *option_words = words;
        }
        self
    }

    /// IPv4 fragment offset (8-byte units) and more-fragments flag.
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        if let L3::V4 {
            frag_offset,
            more_fragments,
            ..
        } = &mut self.l3
        {
            *frag_offset = offset;
            *more_fragments = more;
        }
        self
    }

    /// Overrides the IPv4 version/IHL byte.
    pub fn ipv4_version_ihl(mut self, byte: u8) -> Self {
        if let L3::V4 { version_ihl, .. } = &mut self.l3 {
            *version_ihl = Some(byte);
        }
        self
    }

    /// Overrides the IPv6 version nibble.
    pub fn ipv6_version(mut self, v: u8) -> Self {
        if let L3::V6 { version, .. } = &mut self.l3 {
            *version = v;
        }
        self
    }

    /// Appends an IPv6 extension header.
    pub fn ext(mut self, header: Ext) -> Self {
        if let L3::V6 { ext, .. } = &mut self.l3 {
            ext.push(header);
        }
        self
    }

    pub fn tcp(mut self, sport: u16, dport: u16) -> Self {
        self.protocol = IPPROTO_TCP;
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4; // data offset
        h[13] = 0x02; // SYN
        h[14..16].copy_from_slice(&64240u16.to_be_bytes());
        self.l4 = h;
        self
    }

    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.protocol = IPPROTO_UDP;
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        self.l4 = h;
        self
    }

    /// Another transport protocol, with no header of its own here.
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self.l4.clear();
        self
    }

    /// `len` payload bytes after the transport header.
    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        let ethertype = match &self.l3 {
            L3::V4 { .. } => ETH_P_IP,
            L3::V6 { .. } => ETH_P_IPV6,
            L3::Raw(t) => *t,
        };
        for (i, tpid) in self.vlans.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(100 + i as u16).to_be_bytes()); // TCI: VLAN id
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        let upper_len = self.l4.len() + self.payload;
        match &self.l3 {
            L3::V4 {
                src,
                dst,
                option_words,
                frag_offset,
                more_fragments,
                version_ihl,
            } => {
                let ihl = 5 + option_words;
                let total = usize::from(ihl) * 4 + upper_len;
                let mut h = vec![0u8; usize::from(ihl) * 4];
                h[0] = version_ihl.unwrap_or(0x40 | ihl);
                h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                let frag = (u16::from(*more_fragments) << 13) | (frag_offset & 0x1fff);
                h[6..8].copy_from_slice(&frag.to_be_bytes());
                h[8] = 64;
                h[9] = self.protocol;
                h[12..16].copy_from_slice(&src.octets());
                h[16..20].copy_from_slice(&dst.octets());
                for word in 0..usize::from(*option_words) {
                    h[20 + word * 4] = 1; // NOP options
                }
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                f.extend_from_slice(&h);
            }
            L3::V6 {
                src,
                dst,
                ext,
                version,
            } => {
                let mut exts = Vec::new();
                for (i, e) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map_or(self.protocol, |n| n.protocol());
                    exts.extend(e.bytes(next));
                }
                let first = ext.first().map_or(self.protocol, |e| e.protocol());
                let mut h = vec![0u8; 40];
                h[0] = version << 4;
                h[4..6].copy_from_slice(&((exts.len() + upper_len) as u16).to_be_bytes());
                h[6] = first;
                h[7] = 64;
                h[8..24].copy_from_slice(&src.octets());
                h[24..40].copy_from_slice(&dst.octets());
                f.extend_from_slice(&h);
                f.extend_from_slice(&exts);
            }
            L3::Raw(_) => {}
        }
        f.extend_from_slice(&self.l4);
        f.resize(f.len() + self.payload, 0);
        f
    }

    /// Offsets at which each header of the frame starts, and its end: every
    /// boundary a truncation test should cut at.
    pub fn boundaries(&self) -> Vec<usize> {
        let mut cuts = vec![0, 6, 12];
        let mut at = 12 + 4 * self.vlans.len();
        for v in 0..self.vlans.len() {
            cuts.push(12 + 4 * v + 2);
        }
        cuts.push(at);
        at += 2;
        cuts.push(at);
        match &self.l3 {
            L3::V4 { option_words, .. } => {
                cuts.push(at + 10);
                cuts.push(at + 19);
                cuts.push(at + 20);
                at += 20 + 4 * usize::from(*option_words);
                cuts.push(at);
            }
            L3::V6 { ext, .. } => {
                cuts.push(at + 20);
                cuts.push(at + 39);
                at += 40;
                cuts.push(at);
                for e in ext {
                    let len = e.bytes(0).len();
                    cuts.push(at + 1);
                    at += len;
                    cuts.push(at - 1);
                    cuts.push(at);
                }
            }
            L3::Raw(_) => {}
        }
        if !self.l4.is_empty() {
            cuts.push(at + 2);
            cuts.push(at + 4);
            cuts.push(at + self.l4.len() - 1);
        }
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }
}

/// RFC 1071 Internet checksum.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_tcp_layout() {
        let f = Packet::ipv4([192, 0, 2, 1], [198, 51, 100, 1])
            .tcp(1, 443)
            .build();
        assert_eq!(f.len(), 54);
        assert_eq!(&f[12..14], &ETH_P_IP.to_be_bytes());
        assert_eq!(f[14], 0x45);
        assert_eq!(&f[26..30], &[192, 0, 2, 1]);
        assert_eq!(&f[36..38], &443u16.to_be_bytes());
        // A valid header checksums to zero.
        assert_eq!(checksum(&f[14..34]), 0);
    }

    #[test]
    fn ipv6_chain_links_next_headers() {
        let f = Packet::ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST)
            .ext(Ext::HopByHop { len8: 0 })
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .udp(1, 53)
            .build();
        assert_eq!(f[14 + 6], 0); // fixed header -> hop-by-hop
        assert_eq!(f[54], 44); // hop-by-hop -> fragment
        assert_eq!(f[62], IPPROTO_UDP); // fragment -> UDP
        assert_eq!(&f[72..74], &53u16.to_be_bytes());
    }
}
