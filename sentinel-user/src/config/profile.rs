//! The `profile { ... }` block: the runtime profile (seed:
//! `whale-sentinel-agents.txt`) done at the proxy for every app behind it:
//! the operation mode, secure response headers, and request metadata
//! records with where they go. Routes may override the mode and the secure
//! headers (`route "x" { profile { ... } }`).

use std::{path::PathBuf, time::Duration};

use super::AgentTls;

/// Operation mode of the runtime profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileMode {
    /// Pure pass-through: no inspection, no agent calls, no metadata.
    Off,
    /// Metadata only, never delaying a request.
    Lite,
    /// Full inspection; decisions recorded as "would have", never enforced.
    Monitor,
    /// Decisions enforced. Default.
    Protection,
}

impl ProfileMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            ProfileMode::Off => "off",
            ProfileMode::Lite => "lite",
            ProfileMode::Monitor => "monitor",
            ProfileMode::Protection => "protection",
        }
    }
}

/// Values of the secure response headers (`secure-headers { ... }`). An
/// empty value leaves that header out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureHeaders {
    /// Default: `DENY`.
    pub x_frame_options: String,
    /// Default: `nosniff`.
    pub x_content_type_options: String,
    /// Default: `strict-origin-when-cross-origin`.
    pub referrer_policy: String,
    /// Default: `camera=(), microphone=(), geolocation=()`.
    pub permissions_policy: String,
    /// Default: `same-origin`.
    pub cross_origin_opener_policy: String,
    /// Sent on TLS listeners only. Default: `max-age=31536000; includeSubDomains`.
    pub strict_transport_security: String,
    /// Replace a value the upstream set; by default the upstream's stays.
    pub override_upstream: bool,
}

impl Default for SecureHeaders {
    fn default() -> Self {
        Self {
            x_frame_options: "DENY".to_owned(),
            x_content_type_options: "nosniff".to_owned(),
            referrer_policy: "strict-origin-when-cross-origin".to_owned(),
            permissions_policy: "camera=(), microphone=(), geolocation=()".to_owned(),
            cross_origin_opener_policy: "same-origin".to_owned(),
            strict_transport_security: "max-age=31536000; includeSubDomains".to_owned(),
            override_upstream: false,
        }
    }
}

/// `metadata { ... }`: what a request's record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataConfig {
    /// `agent_id` of every record. Default: the host name.
    pub agent_id: Option<String>,
    /// `agent_name` of every record. Default: `sentinel`.
    pub agent_name: String,
    /// Request body bytes kept in `request.body` (text, redacted). 0 keeps
    /// none. Default: 2048.
    pub body_bytes: u64,
    /// Bytes of each uploaded file kept, base64, in `file_content`; 0 keeps
    /// none. Default: 0.
    pub file_content_bytes: u64,
    /// Header values replaced by `[redacted]` before a record leaves the
    /// process. Default: authorization, cookie, set-cookie,
    /// proxy-authorization.
    pub redact_headers: Vec<String>,
    /// Fields (JSON keys, form and query parameters) whose values are
    /// replaced by `[redacted]`. Default: password, passwd, secret, token,
    /// access_token, api_key.
    pub redact_fields: Vec<String>,
    /// How often host and process facts are sampled. Default: 10 s.
    pub host_sample_interval: Duration,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        Self {
            agent_id: None,
            agent_name: "sentinel".to_owned(),
            body_bytes: 2048,
            file_content_bytes: 0,
            redact_headers: [
                "authorization",
                "cookie",
                "set-cookie",
                "proxy-authorization",
            ]
            .map(str::to_owned)
            .to_vec(),
            redact_fields: [
                "password",
                "passwd",
                "secret",
                "token",
                "access_token",
                "api_key",
            ]
            .map(str::to_owned)
            .to_vec(),
            host_sample_interval: Duration::from_secs(10),
        }
    }
}

/// `store { ... }`: the local store of records (JSON Lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Directory of the segment files. Required.
    pub path: PathBuf,
    /// Size at which a segment is closed and a new one begun. Default:
    /// 64 MiB.
    pub max_file_bytes: u64,
    /// Segments kept; the oldest beyond it is deleted. Default: 8.
    pub max_files: usize,
    /// Records waiting to be written; a request finding it full drops its
    /// record (counted) rather than wait. Default: 10,000.
    pub queue_capacity: usize,
    /// How often written records are fsynced. Default: 1000 ms.
    pub fsync_interval: Duration,
}

/// `collector { ... }`: records shipped over HTTP(S), store-and-forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorConfig {
    /// `http://` or `https://` URL records are POSTed to. Required.
    pub url: String,
    /// Records per request. Default: 500.
    pub batch_size: usize,
    /// How long records wait for a batch to fill. Default: 1000 ms.
    pub flush_interval: Duration,
    /// Per request. Default: 5000 ms.
    pub timeout: Duration,
    /// Backoff after a failure, doubling up to the maximum. Defaults:
    /// 200 ms, 30 s.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Extra request headers (`header "authorization" "Bearer ..."`).
    pub headers: Vec<(String, String)>,
    pub tls: AgentTls,
}

/// The `profile { ... }` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileConfig {
    /// Default: `Protection`.
    pub mode: ProfileMode,
    /// Add the secure response headers. Default: false.
    pub secure_response_headers: bool,
    pub secure_headers: SecureHeaders,
    pub metadata: MetadataConfig,
    /// Default: none (records are not kept).
    pub store: Option<StoreConfig>,
    /// Default: none. Needs `store`.
    pub collector: Option<CollectorConfig>,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            mode: ProfileMode::Protection,
            secure_response_headers: false,
            secure_headers: SecureHeaders::default(),
            metadata: MetadataConfig::default(),
            store: None,
            collector: None,
        }
    }
}

/// A route's `profile { ... }`: what it changes of the global block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteProfile {
    pub mode: Option<ProfileMode>,
    pub secure_response_headers: Option<bool>,
}
