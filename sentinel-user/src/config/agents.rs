//! The `agents`, `filters` and `waf` blocks, exactly as the seed
//! (`sentinel-agents-config.txt`) gives their syntax, options and defaults.

use std::{path::PathBuf, time::Duration};

use super::proxy::FailureMode;

/// `type="waf" | "auth" | "rate_limit" | "custom"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentType {
    Waf,
    Auth,
    RateLimit,
    Custom,
}

/// Lifecycle events an agent subscribes to (`events "request_headers" ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentEvent {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    Log,
    WebsocketFrame,
    /// Extension: the request body's text for prompt-injection and PII
    /// checks (`guardrail_inspect` events, one per `guardrail-types`).
    GuardrailInspect,
}

impl AgentEvent {
    pub const ALL: [(&'static str, AgentEvent); 7] = [
        ("request_headers", AgentEvent::RequestHeaders),
        ("request_body", AgentEvent::RequestBody),
        ("response_headers", AgentEvent::ResponseHeaders),
        ("response_body", AgentEvent::ResponseBody),
        ("log", AgentEvent::Log),
        ("websocket_frame", AgentEvent::WebsocketFrame),
        ("guardrail_inspect", AgentEvent::GuardrailInspect),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, e)| *e == self)
            .map_or("?", |(n, _)| n)
    }
}

/// TLS options of a `grpc` or `http` transport.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentTls {
    /// Default: the system's native roots.
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Logs "TLS certificate verification disabled for agent connection".
    pub insecure_skip_verify: bool,
}

/// How Sentinel reaches an agent: exactly one per agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentTransport {
    UnixSocket(PathBuf),
    Grpc { url: String, tls: AgentTls },
    Http { url: String, tls: AgentTls },
}

/// `request-body-mode` / `response-body-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Collect the entire body before sending. Default.
    Buffer,
    /// Send chunks as they arrive.
    Stream,
    /// Buffer up to this many bytes, then stream.
    Hybrid(u64),
}

/// `circuit-breaker { ... }`; defaults from the seed's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreakerConfig {
    /// Default: 5.
    pub failure_threshold: u32,
    /// Default: 2.
    pub success_threshold: u32,
    /// Default: 30 s.
    pub timeout: Duration,
    /// Default: 1.
    pub half_open_max_requests: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            success_threshold: 2,
            timeout: Duration::from_secs(30),
            half_open_max_requests: 1,
        }
    }
}

/// `kernel-push { ... }`: the agent may ask for its clients to be denied
/// (or watched) in the kernel. Absent: it may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPushConfig {
    /// Upper bound and default of a push's TTL. Default: 3600 s.
    pub max_ttl: Duration,
    /// Shortest IPv4 prefix a push may name. Default: 32 (the client only).
    pub min_prefix_len_v4: u8,
    /// Shortest IPv6 prefix a push may name. Default: 64.
    pub min_prefix_len_v6: u8,
}

impl Default for KernelPushConfig {
    fn default() -> Self {
        Self {
            max_ttl: Duration::from_secs(3600),
            min_prefix_len_v4: 32,
            min_prefix_len_v6: 64,
        }
    }
}

/// `agent "name" type="..." { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub name: String,
    pub agent_type: AgentType,
    pub transport: AgentTransport,
    /// Default: none (the agent receives nothing until a filter routes to
    /// it, and then only these).
    pub events: Vec<AgentEvent>,
    /// Total call timeout. Default: 1000 ms.
    pub timeout: Duration,
    /// Per-chunk timeout when streaming. Default: 5000 ms.
    pub chunk_timeout: Duration,
    /// Default: `Open`.
    pub failure_mode: FailureMode,
    /// Always present; the seed's defaults when the block is absent.
    pub circuit_breaker: CircuitBreakerConfig,
    /// Default: `None` (the route's and the waf block's limits apply).
    pub max_request_body_bytes: Option<u64>,
    pub max_response_body_bytes: Option<u64>,
    /// Default: `Buffer`.
    pub request_body_mode: BodyMode,
    /// Default: `Buffer`.
    pub response_body_mode: BodyMode,
    /// The `config { ... }` block, sent to the agent when it connects, as
    /// JSON: each child node becomes a key; one argument becomes its value,
    /// several an array, children an object.
    pub config: serde_json::Value,
    /// Calls in flight at once; a call over it waits for a slot within its
    /// timeout. Default: 100.
    pub max_concurrent_calls: usize,
    /// Default: `None` (no kernel pushes).
    pub kernel_push: Option<KernelPushConfig>,
    /// `inspection_type`s of the `guardrail_inspect` events sent per
    /// request. Default: `["prompt_injection"]`.
    pub guardrail_types: Vec<String>,
}

impl AgentConfig {
    pub fn subscribes(&self, event: AgentEvent) -> bool {
        self.events.contains(&event)
    }
}

/// Which side of the exchange a filter runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterPhase {
    Request,
    Response,
    Both,
}

/// `filter "name" { type "agent" agent "..." phase "request" ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    pub name: String,
    /// `type "agent"` is the only type today; the agent it calls.
    pub agent: String,
    /// Default: `Request`.
    pub phase: FilterPhase,
    /// Overrides the agent's `timeout-ms`.
    pub timeout: Option<Duration>,
    /// Overrides the agent's `failure-mode`.
    pub failure_mode: Option<FailureMode>,
}

/// `waf { body-inspection { ... } }`; defaults from the seed's table.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyInspection {
    /// Default: false.
    pub inspect_request_body: bool,
    /// Default: false.
    pub inspect_response_body: bool,
    /// Default: 1,048,576.
    pub max_body_inspection_bytes: u64,
    /// Default: application/json, application/x-www-form-urlencoded,
    /// text/xml, application/xml, text/plain.
    pub content_types: Vec<String>,
    /// Default: false.
    pub decompress: bool,
    /// Default: 100.0.
    pub max_decompression_ratio: f64,
    /// Hard cap on decompressed output. Default: 10 MiB.
    pub max_decompressed_bytes: u64,
}

pub const DEFAULT_INSPECTION_CONTENT_TYPES: [&str; 5] = [
    "application/json",
    "application/x-www-form-urlencoded",
    "text/xml",
    "application/xml",
    "text/plain",
];

impl Default for BodyInspection {
    fn default() -> Self {
        Self {
            inspect_request_body: false,
            inspect_response_body: false,
            max_body_inspection_bytes: 1_048_576,
            content_types: DEFAULT_INSPECTION_CONTENT_TYPES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            decompress: false,
            max_decompression_ratio: 100.0,
            max_decompressed_bytes: 10 * 1024 * 1024,
        }
    }
}

/// `waf { challenge { ... } }`: how a `challenge` decision is answered.
/// Sentinel serves the page and verifies the answer itself (a proof of
/// work), so no request passes a challenge unchallenged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeConfig {
    /// Status of the challenge page. Default: 403.
    pub status: u16,
    /// HTML template replacing the built-in page; see docs/agents.md for
    /// its placeholders. Default: the built-in page.
    pub page: Option<PathBuf>,
    /// Cookie that carries a passed challenge. Default: `sentinel_challenge`.
    pub cookie_name: String,
    /// How long a passed challenge is honoured. Default: 3600 s.
    pub ttl: Duration,
    /// Leading zero bits the proof of work needs. Default: 16.
    pub difficulty: u8,
    /// File with the HMAC key for challenge tokens (at least 32 bytes), so
    /// tokens survive restarts and are shared by several daemons.
    /// Default: a random key per start.
    pub secret_file: Option<PathBuf>,
}

impl Default for ChallengeConfig {
    fn default() -> Self {
        Self {
            status: 403,
            page: None,
            cookie_name: "sentinel_challenge".to_owned(),
            ttl: Duration::from_secs(3600),
            difficulty: 16,
            secret_file: None,
        }
    }
}

/// The `waf { ... }` block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WafConfig {
    pub body_inspection: BodyInspection,
    pub challenge: ChallengeConfig,
}
