//! The reverse proxy's blocks: `system`, `listeners`, `routes`,
//! `upstreams` and `limits`.
//!
//! The seed names these blocks without spelling out their options; they are
//! designed in its style (units in option names, kebab-case, one node per
//! option) and every option is listed, with its default, in
//! docs/configuration.md.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// `system { ... }`: process-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemConfig {
    /// Tokio worker threads; 0 means one per CPU. Default: 0.
    pub worker_threads: usize,
    /// Client connections open at once, over all listeners; a connection
    /// beyond it is accepted and closed at once. Default: 10,000.
    pub max_connections: usize,
    /// How long SIGTERM waits for in-flight requests before exiting.
    /// Default: 30 s.
    pub graceful_shutdown_timeout: Duration,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            worker_threads: 0,
            max_connections: 10_000,
            graceful_shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// Plain text: HTTP/1.1, and HTTP/2 with prior knowledge (h2c).
    Http,
    /// TLS, then HTTP/2 or HTTP/1.1 as ALPN chooses.
    Https,
}

/// Minimum TLS protocol version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Certificates are not requested. Default.
    None,
    /// A certificate is requested and verified when given.
    Optional,
    /// A connection without a valid certificate is refused.
    Required,
}

/// A certificate and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKey {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A certificate chosen by SNI for the names it lists (`*.example.com`
/// matches one label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCertificate {
    pub names: Vec<String>,
    pub cert: CertKey,
}

/// `tls { ... }` of an `https` listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Served when SNI names none of `sni` (or the client sends no SNI).
    pub default_cert: CertKey,
    pub sni: Vec<SniCertificate>,
    /// Default: TLS 1.2.
    pub min_version: TlsVersion,
    /// CA bundle that client certificates must chain to; required when
    /// `client_auth` is not `None`.
    pub client_ca: Option<PathBuf>,
    /// Default: `None`.
    pub client_auth: ClientAuth,
}

/// `listener "name" { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    /// Default: `Http`.
    pub protocol: ListenerProtocol,
    /// Required when `protocol` is `Https`, refused otherwise.
    pub tls: Option<ListenerTls>,
    /// A client that has not sent a whole request head within this time is
    /// disconnected (slowloris). Default: 10 s.
    pub header_read_timeout: Duration,
    /// Idle time after which a keep-alive connection is closed.
    /// Default: 75 s.
    pub keepalive_timeout: Duration,
    /// Whole-request deadline, from the first byte of the head to the last
    /// byte of the response; 0 disables it. Default: 60 s.
    pub request_timeout: Duration,
    /// Connections open at once on this listener; `None` leaves only the
    /// system-wide cap. Default: `None`.
    pub max_connections: Option<usize>,
    /// Connections from watchlisted sources to any steered or listener
    /// address land here instead (sk_lookup). At most one listener.
    /// Default: false.
    pub quarantine: bool,
}

/// `routes { route "name" { ... } }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub name: String,
    /// Routes are tried by descending priority, then in file order.
    /// Default: 0.
    pub priority: i64,
    pub matches: RouteMatch,
    /// The upstream requests are forwarded to. Exactly one of `upstream`
    /// and `static_response` is set.
    pub upstream: Option<String>,
    /// Answer directly with this status and body, without an upstream
    /// (`static-response 404 "not here"`).
    pub static_response: Option<StaticResponse>,
    /// Filter names applied in order (`filters "a" "b"`).
    pub filters: Vec<String>,
    pub policies: RoutePolicies,
    /// `profile { ... }`: this route's mode and secure headers, over the
    /// global `profile` block's.
    pub profile: super::RouteProfile,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticResponse {
    pub status: u16,
    pub body: String,
}

/// `matches { ... }`: every condition given must hold; the values of one
/// condition are alternatives. An empty block matches every request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// `path-prefix "/api/"`: the path starts with one of these.
    pub path_prefix: Vec<String>,
    /// `path "/healthz"`: the path is exactly one of these.
    pub path: Vec<String>,
    /// `host "api.example.com" "*.example.com"`: the request's host (port
    /// removed, lowercased) is one of these; `*.` matches one or more
    /// labels.
    pub host: Vec<String>,
    /// `method "GET" "POST"`.
    pub method: Vec<String>,
    /// `header "x-env" "prod"` (that value) or `header "x-debug"` (present).
    /// One node per header; all must hold.
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lowercased.
    pub name: String,
    pub value: Option<String>,
}

/// What to do when something a request depends on fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Let the request through (availability first).
    Open,
    /// Refuse the request (security first).
    Closed,
}

/// `policies { ... }` of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicies {
    /// Used for decompression errors and filters without their own.
    /// Default: `Closed`.
    pub failure_mode: FailureMode,
    /// Request body cap for this route; `None` uses `limits`.
    pub max_body_bytes: Option<u64>,
    /// Overrides the upstream's total request timeout.
    pub timeout: Option<Duration>,
}

impl Default for RoutePolicies {
    fn default() -> Self {
        Self {
            failure_mode: FailureMode::Closed,
            max_body_bytes: None,
            timeout: None,
        }
    }
}

/// How an upstream picks a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalancing {
    /// Default.
    RoundRobin,
    LeastConnections,
}

/// HTTP version spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Default.
    Http1,
    /// HTTP/2 (prior knowledge without TLS, ALPN with it).
    Http2,
}

/// `target { address "10.0.0.1:8080" weight 1 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// `host:port`; a name is resolved when connecting.
    pub address: String,
    /// Default: 1. Round-robin visits a target `weight` times per cycle.
    pub weight: u32,
}

/// `tls { ... }` of an upstream: TLS to the targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Name sent in SNI and checked in the certificate; default: the
    /// target's host.
    pub sni: Option<String>,
    /// Default: the system's roots.
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<CertKey>,
    /// Logs a warning; development only.
    pub insecure_skip_verify: bool,
}

/// `health-check { ... }`: active HTTP probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Default: `/health`.
    pub path: String,
    /// Default: 200.
    pub expected_status: u16,
    /// Default: 10 s.
    pub interval: Duration,
    /// Default: 2 s.
    pub timeout: Duration,
    /// Consecutive successes that bring a target back. Default: 2.
    pub healthy_threshold: u32,
    /// Consecutive failures that take a target out. Default: 3.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            path: "/health".to_owned(),
            expected_status: 200,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// `passive-health { ... }`: ejection on real traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Consecutive failed requests (connect error, timeout, 5xx when
    /// `count-5xx`) that eject a target. Default: 5.
    pub consecutive_failures: u32,
    /// How long an ejected target rests before it is tried again.
    /// Default: 30 s.
    pub ejection_time: Duration,
    /// Whether 502/503/504 from the target count as failures. Default: true.
    pub count_5xx: bool,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
            count_5xx: true,
        }
    }
}

/// `timeouts { ... }` of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// TCP (and TLS) connection establishment. Default: 5 s.
    pub connect: Duration,
    /// Waiting for the response head, and between body reads. Default: 30 s.
    pub read: Duration,
    /// Whole exchange, retries included. Default: 60 s.
    pub total: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(30),
            total: Duration::from_secs(60),
        }
    }
}

/// `connection-pool { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionPool {
    /// Idle keep-alive connections kept per target. Default: 64.
    pub max_idle: usize,
    /// Default: 60 s.
    pub idle_timeout: Duration,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_idle: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The most `retries` an upstream may have.
pub const MAX_RETRIES: u32 = 10;

/// `upstream "name" { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    /// At least one.
    pub targets: Vec<TargetConfig>,
    /// Default: `RoundRobin`.
    pub load_balancing: LoadBalancing,
    /// Default: `Http1`.
    pub protocol: UpstreamProtocol,
    pub tls: Option<UpstreamTls>,
    /// `None`: no active checks; targets are healthy until passive ejection.
    pub health_check: Option<HealthCheck>,
    pub passive_health: PassiveHealth,
    pub timeouts: UpstreamTimeouts,
    /// Extra attempts on another target for idempotent requests (GET, HEAD,
    /// OPTIONS, PUT, DELETE, TRACE) whose request body has not been
    /// streamed. Default: 1; at most [`MAX_RETRIES`].
    pub retries: u32,
    pub pool: ConnectionPool,
}

/// `limits { ... }`: what a client may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Total bytes of the request head (request line and headers); over it
    /// is 431. Default: 65,536 (64 KiB).
    pub max_header_bytes: usize,
    /// Header fields in a request; over it is 431. Default: 100.
    pub max_header_count: usize,
    /// Request body bytes; over it is 413. Default: 10,485,760 (10 MiB);
    /// 0 means no limit.
    pub max_body_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_header_count: 100,
            max_body_bytes: 10 * 1024 * 1024,
        }
    }
}
