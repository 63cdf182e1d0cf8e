//! The admin API: newline-delimited JSON over a Unix socket (mode 0600)
//! served by the daemon. One request per line, one response per line; a
//! connection may carry many. The CLI is its main client, but any tool can
//! speak it (docs/operations.md shows it with `socat`).

pub mod client;
pub mod packed;
pub mod server;
mod watch;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{kernel::InterfaceStats, net::RuleList};

/// Largest request line accepted (an import chunk of 50,000 prefixes is
/// about 1.5 MB).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// A request, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Add or replace one entry.
    Add {
        list: RuleList,
        prefix: String,
        /// Milliseconds; absent: the configured default TTL.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Add or replace many entries with batched map updates.
    Import {
        list: RuleList,
        prefixes: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Add or replace many entries sent as binary records after this line
    /// ([`packed`]): the daemon checks the line and answers [`Ready`], the
    /// client then sends exactly `Ready::body_bytes` bytes, and the daemon
    /// answers as for `import`. Offered when `status` lists
    /// [`FEATURE_IMPORT_PACKED`].
    ImportPacked {
        list: RuleList,
        /// IPv4 records in the body.
        v4: u32,
        /// IPv6 records in the body, after the IPv4 ones.
        v6: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Remove {
        list: RuleList,
        prefix: String,
    },
    List {
        list: RuleList,
    },
    /// Add or replace a watchlist entry: its connections go to the
    /// quarantine listener.
    WatchAdd {
        prefix: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    WatchRemove {
        prefix: String,
    },
    WatchList {},
    /// Kernel counters per interface.
    Stats {},
    /// What the daemon runs with: version, pin path, metrics address,
    /// attached interfaces.
    Status {},
}

/// A response: `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
///
/// `result` is kept as raw JSON text: a listing of a million entries is
/// written and read once, without building a value tree on either side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<serde_json::value::RawValue>>,
}

/// Result of `add`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Added {
    pub prefix: IpNet,
    /// `false` when an existing entry was replaced.
    pub created: bool,
    /// `None`: never expires.
    pub ttl_seconds: Option<f64>,
}

/// Result of `import`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImportResult {
    pub created: usize,
    pub replaced: usize,
}

/// What `status` lists in `features` when the daemon serves
/// `import_packed`; older daemons list nothing, and clients fall back to
/// `import`.
pub const FEATURE_IMPORT_PACKED: &str = "import_packed";

/// First answer to `import_packed`: send the body now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ready {
    pub body_bytes: usize,
}

/// Result of `remove`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Removed {
    pub prefix: IpNet,
}

/// One entry of `list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub prefix: IpNet,
    pub source: String,
    pub reason: String,
    /// Seconds left; `None`: never expires.
    pub ttl_remaining_seconds: Option<f64>,
    pub hits: u64,
    /// RFC 3339 UTC; `None`: never hit.
    pub last_hit: Option<String>,
    /// RFC 3339 UTC.
    pub created: String,
}

/// Result of `stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub interfaces: Vec<InterfaceStats>,
    pub denylist_entries: usize,
    pub allowlist_entries: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The requests shown in docs/operations.md parse as documented.
    #[test]
    fn documented_requests_parse() {
        let cases = [
            (
                r#"{"op":"add","list":"deny","prefix":"192.0.2.0/24","ttl_ms":600000,"reason":"scanner"}"#,
                Request::Add {
                    list: RuleList::Deny,
                    prefix: "192.0.2.0/24".into(),
                    ttl_ms: Some(600_000),
                    reason: Some("scanner".into()),
                },
            ),
            (
                r#"{"op":"import","list":"deny","prefixes":["192.0.2.1","198.51.100.0/24"],"ttl_ms":3600000}"#,
                Request::Import {
                    list: RuleList::Deny,
                    prefixes: vec!["192.0.2.1".into(), "198.51.100.0/24".into()],
                    ttl_ms: Some(3_600_000),
                    reason: None,
                },
            ),
            (
                r#"{"op":"remove","list":"deny","prefix":"192.0.2.0/24"}"#,
                Request::Remove {
                    list: RuleList::Deny,
                    prefix: "192.0.2.0/24".into(),
                },
            ),
            (
                r#"{"op":"list","list":"allow"}"#,
                Request::List {
                    list: RuleList::Allow,
                },
            ),
            (
                r#"{"op":"import_packed","list":"deny","v4":2,"v6":1,"reason":"feed"}"#,
                Request::ImportPacked {
                    list: RuleList::Deny,
                    v4: 2,
                    v6: 1,
                    ttl_ms: None,
                    reason: Some("feed".into()),
                },
            ),
            (r#"{"op":"stats"}"#, Request::Stats {}),
            (r#"{"op":"status"}"#, Request::Status {}),
        ];
        for (text, want) in cases {
            let got: Request = serde_json::from_str(text).unwrap();
            assert_eq!(got, want, "{text}");
            // And what the CLI sends reads back the same.
            let again: Request =
                serde_json::from_str(&serde_json::to_string(&got).unwrap()).unwrap();
            assert_eq!(again, want);
        }
    }

    #[test]
    fn malformed_requests_are_errors() {
        for text in [
            r#"{"op":"explode"}"#,
            r#"{"op":"add","list":"maybe","prefix":"192.0.2.0/24"}"#,
            r#"{"op":"add","list":"deny"}"#,
            r#"{"op":"add","list":"deny","prefix":"192.0.2.0/24","ttl_ms":-5}"#,
            r#"{"op":"stats","extra":1}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(text).is_err(), "{text}");
        }
    }
}
