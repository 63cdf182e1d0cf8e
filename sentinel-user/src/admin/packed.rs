//! The body of an `import_packed` request: fixed-size binary records, so
//! that a million prefixes cross the admin socket as 5 to 17 MB the daemon
//! reads with one copy, instead of a million JSON strings it would parse
//! and allocate one by one.
//!
//! All IPv4 records come first, then all IPv6 records (the request line
//! gives both counts):
//!
//! - IPv4: the network address, 4 bytes in network order, then the prefix
//!   length, 1 byte (5 bytes);
//! - IPv6: the network address, 16 bytes in network order, then the prefix
//!   length, 1 byte (17 bytes).
//!
//! Order within a family is kept. The daemon checks every record as it
//! checks a prefix typed as text (`net::check_prefix`) before writing any.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::net::{InputError, RuleList, check_prefix};

pub const V4_RECORD: usize = 5;
pub const V6_RECORD: usize = 17;

/// Most records one request may announce: the body stays under 300 MB
/// and the count fits every map capacity option.
pub const MAX_RECORDS: u64 = 1 << 24;

/// Why a packed body was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PackedError {
    #[error(
        "an import of {records} entries is more than the {MAX_RECORDS} one request may carry; split it"
    )]
    TooMany { records: u64 },
    #[error("entry {position}: prefix length {len} is longer than {max}")]
    Length { position: usize, len: u8, max: u8 },
    #[error("entry {position}: {source}")]
    Invalid {
        position: usize,
        #[source]
        source: InputError,
    },
    #[error("the body is {got} bytes, the request announced {want}")]
    Size { got: usize, want: usize },
}

/// Bytes of a body of `v4` and `v6` records, if the counts are allowed.
pub fn body_len(v4: u32, v6: u32) -> Result<usize, PackedError> {
    let records = u64::from(v4) + u64::from(v6);
    if records > MAX_RECORDS {
        return Err(PackedError::TooMany { records });
    }
    Ok(v4 as usize * V4_RECORD + v6 as usize * V6_RECORD)
}

/// The counts and body of `prefixes`.
pub fn encode(prefixes: &[IpNet]) -> (u32, u32, Vec<u8>) {
    let v4 = prefixes.iter().filter(|p| p.addr().is_ipv4()).count();
    let v6 = prefixes.len() - v4;
    let mut body = Vec::with_capacity(v4 * V4_RECORD + v6 * V6_RECORD);
    for prefix in prefixes {
        if let IpNet::V4(net) = prefix {
            body.extend_from_slice(&net.network().octets());
            body.push(net.prefix_len());
        }
    }
    for prefix in prefixes {
        if let IpNet::V6(net) = prefix {
            body.extend_from_slice(&net.network().octets());
            body.push(net.prefix_len());
        }
    }
    (v4 as u32, v6 as u32, body)
}

/// The prefixes of a body, each checked for `list`; the first bad record
/// (1-based position in the body) refuses the whole body.
pub fn decode(v4: u32, v6: u32, body: &[u8], list: RuleList) -> Result<Vec<IpNet>, PackedError> {
    let want = body_len(v4, v6)?;
    if body.len() != want {
        return Err(PackedError::Size {
            got: body.len(),
            want,
        });
    }
    let (v4_body, v6_body) = body.split_at(v4 as usize * V4_RECORD);
    let mut out = Vec::with_capacity(v4 as usize + v6 as usize);
    let check = |position: usize, net: IpNet| {
        check_prefix(net, list).map_err(|source| PackedError::Invalid { position, source })
    };
    for (i, record) in v4_body.chunks_exact(V4_RECORD).enumerate() {
        let addr = Ipv4Addr::new(record[0], record[1], record[2], record[3]);
        let len = record[4];
        let net = Ipv4Net::new(addr, len).map_err(|_| PackedError::Length {
            position: i + 1,
            len,
            max: 32,
        })?;
        out.push(check(i + 1, IpNet::V4(net))?);
    }
    for (i, record) in v6_body.chunks_exact(V6_RECORD).enumerate() {
        let position = v4 as usize + i + 1;
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&record[..16]);
        let len = record[16];
        let net = Ipv6Net::new(Ipv6Addr::from(octets), len).map_err(|_| PackedError::Length {
            position,
            len,
            max: 128,
        })?;
        out.push(check(position, IpNet::V6(net))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(text: &[&str]) -> Vec<IpNet> {
        text.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn round_trip_keeps_each_family_in_order() {
        let prefixes = nets(&[
            "2001:db8::/32",
            "192.0.2.1/32",
            "2001:db8:1::1/128",
            "198.51.100.0/24",
        ]);
        let (v4, v6, body) = encode(&prefixes);
        assert_eq!((v4, v6), (2, 2));
        assert_eq!(body.len(), 2 * V4_RECORD + 2 * V6_RECORD);
        let back = decode(v4, v6, &body, RuleList::Deny).unwrap();
        assert_eq!(
            back,
            nets(&[
                "192.0.2.1/32",
                "198.51.100.0/24",
                "2001:db8::/32",
                "2001:db8:1::1/128",
            ])
        );
    }

    #[test]
    fn bad_records_refuse_the_body() {
        let (v4, v6, body) = encode(&nets(&["192.0.2.0/24", "2001:db8::/32"]));
        // Host bits, as the text path refuses them.
        let mut host_bits = body.clone();
        host_bits[3] = 7;
        assert!(matches!(
            decode(v4, v6, &host_bits, RuleList::Deny),
            Err(PackedError::Invalid {
                position: 1,
                source: InputError::HostBits { .. }
            })
        ));
        // A length past the family's.
        let mut long = body.clone();
        long[V4_RECORD + 16] = 129;
        assert_eq!(
            decode(v4, v6, &long, RuleList::Deny),
            Err(PackedError::Length {
                position: 2,
                len: 129,
                max: 128
            })
        );
        // A /0 on the denylist.
        let (v4, v6, all) = encode(&nets(&["0.0.0.0/0"]));
        assert!(matches!(
            decode(v4, v6, &all, RuleList::Deny),
            Err(PackedError::Invalid {
                source: InputError::DenyAll { .. },
                ..
            })
        ));
        assert!(decode(v4, v6, &all, RuleList::Allow).is_ok());
        // A body that does not match its counts.
        assert_eq!(
            decode(1, 1, &body[1..], RuleList::Deny),
            Err(PackedError::Size {
                got: body.len() - 1,
                want: body.len()
            })
        );
        assert!(matches!(
            body_len(u32::MAX, 1),
            Err(PackedError::TooMany { .. })
        ));
    }
}
