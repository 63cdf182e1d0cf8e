//! Validation of operator input that names addresses and durations, shared
//! by the configuration, the CLI and the admin API so that every entry
//! point refuses the same things with the same words.

use std::{fmt, net::IpAddr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Which address list an entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleList {
    Allow,
    Deny,
}

impl RuleList {
    pub const fn as_str(self) -> &'static str {
        match self {
            RuleList::Allow => "allowlist",
            RuleList::Deny => "denylist",
        }
    }
}

impl fmt::Display for RuleList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a prefix or TTL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("'{text}' is not a CIDR prefix such as 192.0.2.0/24 or 2001:db8::/32")]
    NotCidr { text: String },
    #[error("{text} has host bits set (did you mean {network}?)")]
    HostBits { text: String, network: IpNet },
    #[error("refusing to deny {prefix}: it would drop all {family} traffic")]
    DenyAll { prefix: IpNet, family: &'static str },
    #[error(
        "{prefix} is an IPv4-mapped IPv6 prefix, which never matches on the wire; write it as IPv4"
    )]
    Mapped { prefix: IpNet },
    #[error("'{text}' is not a duration such as 90s, 15m, 12h or 7d")]
    NotDuration { text: String },
    #[error("reason is {len} bytes; at most {max} are stored")]
    ReasonTooLong { len: usize, max: usize },
    #[error("ttl {ttl} is out of range: it must be between 1s and {max}")]
    TtlRange { ttl: String, max: String },
}

/// Parses a CIDR prefix for `list`. A bare address means the host prefix
/// (/32 or /128). Host bits must be zero, so that what an operator typed is
/// exactly what is stored and listed.
pub fn validate_prefix(text: &str, list: RuleList) -> Result<IpNet, InputError> {
    let trimmed = text.trim();
    let not_cidr = || InputError::NotCidr {
        text: text.to_owned(),
    };
    // Lists are mostly bare addresses: parse what the text is, rather than
    // failing a CIDR parse first (this runs a million times per import).
    let net = if trimmed.contains('/') {
        trimmed.parse::<IpNet>().map_err(|_| not_cidr())?
    } else {
        IpNet::from(trimmed.parse::<IpAddr>().map_err(|_| not_cidr())?)
    };
    check_prefix(net, list).map_err(|e| match e {
        InputError::HostBits { network, .. } => InputError::HostBits {
            text: trimmed.to_owned(),
            network,
        },
        other => other,
    })
}

/// The checks of [`validate_prefix`] on a prefix that is already parsed
/// (the packed import, whose records carry address and length): host bits
/// zero, not IPv4-mapped, no /0 on the denylist.
pub fn check_prefix(net: IpNet, list: RuleList) -> Result<IpNet, InputError> {
    if net.trunc() != net {
        return Err(InputError::HostBits {
            text: net.to_string(),
            network: net.trunc(),
        });
    }
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && v6.addr().to_ipv4_mapped().is_some()
    {
        return Err(InputError::Mapped { prefix: net });
    }
    if list == RuleList::Deny && net.prefix_len() == 0 {
        let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(InputError::DenyAll {
            prefix: net,
            family,
        });
    }
    Ok(net)
}

/// Parses a TTL such as `90s`, `15m`, `2h30m` or `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, InputError> {
    humantime::parse_duration(text.trim()).map_err(|_| InputError::NotDuration {
        text: text.to_owned(),
    })
}

/// Reasons are stored in the entry itself, in a fixed field: refuse what
/// would not fit rather than cut it silently.
pub fn check_reason(reason: Option<&str>) -> Result<(), InputError> {
    match reason {
        Some(r) if r.len() > sentinel_common::REASON_LEN => Err(InputError::ReasonTooLong {
            len: r.len(),
            max: sentinel_common::REASON_LEN,
        }),
        _ => Ok(()),
    }
}

/// Checks a TTL against the configured maximum.
pub fn check_ttl(ttl: Duration, max: Duration) -> Result<(), InputError> {
    if ttl < Duration::from_secs(1) || ttl > max {
        return Err(InputError::TtlRange {
            ttl: humantime::format_duration(ttl).to_string(),
            max: humantime::format_duration(max).to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_prefixes_and_bare_addresses() {
        assert_eq!(
            validate_prefix("192.0.2.0/24", RuleList::Deny)
                .unwrap()
                .to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            validate_prefix("192.0.2.7", RuleList::Deny)
                .unwrap()
                .to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            validate_prefix("2001:db8::/32", RuleList::Deny)
                .unwrap()
                .to_string(),
            "2001:db8::/32"
        );
        assert_eq!(
            validate_prefix("2001:db8::1", RuleList::Allow)
                .unwrap()
                .to_string(),
            "2001:db8::1/128"
        );
    }

    #[test]
    fn refuses_bad_prefixes() {
        assert!(matches!(
            validate_prefix("banana", RuleList::Deny),
            Err(InputError::NotCidr { .. })
        ));
        assert!(matches!(
            validate_prefix("192.0.2.0/33", RuleList::Deny),
            Err(InputError::NotCidr { .. })
        ));
        let err = validate_prefix("192.0.2.7/24", RuleList::Deny).unwrap_err();
        assert_eq!(
            err.to_string(),
            "192.0.2.7/24 has host bits set (did you mean 192.0.2.0/24?)"
        );
        assert!(matches!(
            validate_prefix("0.0.0.0/0", RuleList::Deny),
            Err(InputError::DenyAll { .. })
        ));
        assert!(matches!(
            validate_prefix("::/0", RuleList::Deny),
            Err(InputError::DenyAll { .. })
        ));
        assert!(validate_prefix("0.0.0.0/0", RuleList::Allow).is_ok());
        assert!(matches!(
            validate_prefix("::ffff:192.0.2.1/128", RuleList::Deny),
            Err(InputError::Mapped { .. })
        ));
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("2h30m").unwrap(), Duration::from_secs(9000));
        assert!(parse_ttl("soon").is_err());
        let max = Duration::from_secs(3600);
        assert!(check_ttl(Duration::from_secs(60), max).is_ok());
        assert!(check_ttl(Duration::from_millis(10), max).is_err());
        assert!(check_ttl(Duration::from_secs(7200), max).is_err());
    }
}
