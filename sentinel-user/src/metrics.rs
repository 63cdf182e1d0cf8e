//! Prometheus metrics: every family is registered here, and served as text
//! at `/metrics` on the observability address.
//!
//! Kernel counters are per-CPU map values; they are read and summed at scrape
//! time by [`XdpCollector`], so the fast path never pays for metrics beyond
//! its per-CPU increments.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};

use crate::{
    kernel::{Kernel, RuleTables},
    net::RuleList,
};

/// Every metric family of the daemon.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    denylist_entries: IntGauge,
    allowlist_entries: IntGauge,
    denylist_updates: IntCounterVec,
    allowlist_updates: IntCounterVec,
    pub proxy: ProxyMetrics,
    pub agents: crate::agents::metrics::AgentMetrics,
    pub profile: crate::profile::metrics::ProfileMetrics,
}

// Metric definitions below are constants: building them cannot fail at run
// time, so their construction errors are programming errors.
const STATIC: &str = "static metric definition is valid";

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let denylist_entries = IntGauge::new(
            "sentinel_denylist_entries",
            "Entries in the kernel denylist (IPv4 and IPv6), expired ones included until reaped",
        )
        .expect(STATIC);
        let allowlist_entries = IntGauge::new(
            "sentinel_allowlist_entries",
            "Entries in the kernel allowlist (IPv4 and IPv6)",
        )
        .expect(STATIC);
        let denylist_updates = IntCounterVec::new(
            Opts::new(
                "sentinel_denylist_updates_total",
                "Denylist changes by source (config, admin, agent, reaper) and result",
            ),
            &["source", "result"],
        )
        .expect(STATIC);
        let allowlist_updates = IntCounterVec::new(
            Opts::new(
                "sentinel_allowlist_updates_total",
                "Allowlist changes by source (config, admin, reaper) and result",
            ),
            &["source", "result"],
        )
        .expect(STATIC);
        for collector in [
            Box::new(denylist_entries.clone()) as Box<dyn Collector>,
            Box::new(allowlist_entries.clone()),
            Box::new(denylist_updates.clone()),
            Box::new(allowlist_updates.clone()),
        ] {
            registry.register(collector).expect(STATIC);
        }
        let proxy = ProxyMetrics::new(&registry);
        let agents = crate::agents::metrics::AgentMetrics::new(&registry);
        let profile = crate::profile::metrics::ProfileMetrics::new(&registry);
        Self {
            proxy,
            agents,
            profile,
            registry,
            denylist_entries,
            allowlist_entries,
            denylist_updates,
            allowlist_updates,
        }
    }

    /// Registers the scrape-time readers of the XDP and steering counters.
    pub fn register_kernel(&self, kernel: Arc<Mutex<Kernel>>) {
        self.registry
            .register(Box::new(XdpCollector::new(kernel.clone())))
            .expect(STATIC);
        self.registry
            .register(Box::new(SteeringCollector {
                kernel,
                connections: SteeringCollector::family(),
            }))
            .expect(STATIC);
    }

    /// Counts `n` list changes. `source` and `result` come from a fixed set
    /// (see docs/operations.md), never from input.
    pub fn update(&self, list: RuleList, source: &str, result: &str, n: u64) {
        if n == 0 {
            return;
        }
        let family = match list {
            RuleList::Deny => &self.denylist_updates,
            RuleList::Allow => &self.allowlist_updates,
        };
        family.with_label_values(&[source, result]).inc_by(n);
    }

    pub fn set_entries(&self, tables: &RuleTables) {
        self.denylist_entries
            .set(tables.count(RuleList::Deny) as i64);
        self.allowlist_entries
            .set(tables.count(RuleList::Allow) as i64);
    }

    /// The text exposition of every family.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!(%error, "cannot encode metrics");
        }
        out
    }
}

/// The reverse proxy's families. Label values come from the configuration
/// (route, upstream, target and listener names) or from fixed sets (method,
/// result), never from raw request input.
#[derive(Clone)]
pub struct ProxyMetrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_health: IntGaugeVec,
    pub active_connections: IntGaugeVec,
    pub idle_connections: IntGaugeVec,
}

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "sentinel_requests_total",
                "Requests answered, by route (\"none\" when no route matched), method and status",
            ),
            &["route", "method", "status"],
        )
        .expect(STATIC);
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "sentinel_request_duration_seconds",
                "Time from a request's head to its response head, by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["route"],
        )
        .expect(STATIC);
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "sentinel_upstream_requests_total",
                "Attempts sent to upstreams, by upstream and result (2xx, 3xx, 4xx, 5xx, connect_error, timeout, error)",
            ),
            &["upstream", "result"],
        )
        .expect(STATIC);
        let upstream_health = IntGaugeVec::new(
            Opts::new(
                "sentinel_upstream_health",
                "1 when an upstream target takes requests, 0 when health checks or passive ejection took it out",
            ),
            &["upstream", "target"],
        )
        .expect(STATIC);
        let active_connections = IntGaugeVec::new(
            Opts::new(
                "sentinel_active_connections",
                "Client connections open, by listener",
            ),
            &["listener"],
        )
        .expect(STATIC);
        let idle_connections = IntGaugeVec::new(
            Opts::new(
                "sentinel_idle_connections",
                "Client connections parked between requests, held without a task or buffers, by listener (a part of sentinel_active_connections)",
            ),
            &["listener"],
        )
        .expect(STATIC);
        for collector in [
            Box::new(requests.clone()) as Box<dyn Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_requests.clone()),
            Box::new(upstream_health.clone()),
            Box::new(active_connections.clone()),
            Box::new(idle_connections.clone()),
        ] {
            registry.register(collector).expect(STATIC);
        }
        Self {
            requests,
            request_duration,
            upstream_requests,
            upstream_health,
            active_connections,
            idle_connections,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads `XDP_STATS` of every attached interface at scrape time.
struct XdpCollector {
    kernel: Arc<Mutex<Kernel>>,
    packets: IntCounterVec,
    bytes: IntCounterVec,
}

impl XdpCollector {
    fn new(kernel: Arc<Mutex<Kernel>>) -> Self {
        let (packets, bytes) = Self::families();
        Self {
            kernel,
            packets,
            bytes,
        }
    }

    fn families() -> (IntCounterVec, IntCounterVec) {
        let labels = &["interface", "action", "reason"];
        let packets = IntCounterVec::new(
            Opts::new(
                "sentinel_xdp_packets_total",
                "Packets seen by the XDP program, by interface, action (pass, drop) and reason",
            ),
            labels,
        )
        .expect(STATIC);
        let bytes = IntCounterVec::new(
            Opts::new(
                "sentinel_xdp_bytes_total",
                "Bytes seen by the XDP program, by interface, action (pass, drop) and reason",
            ),
            labels,
        )
        .expect(STATIC);
        (packets, bytes)
    }
}

impl Collector for XdpCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.packets.desc();
        descs.extend(self.bytes.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self
            .kernel
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .stats();
        // Fresh vectors each scrape: the kernel holds the totals.
        let (packets, bytes) = Self::families();
        for iface in &stats {
            for r in &iface.reasons {
                let labels = [
                    iface.interface.as_str(),
                    r.action.as_str(),
                    r.reason.as_str(),
                ];
                packets.with_label_values(&labels).inc_by(r.packets);
                bytes.with_label_values(&labels).inc_by(r.bytes);
            }
        }
        let mut families = packets.collect();
        families.extend(bytes.collect());
        families
    }
}

/// Reads the sk_lookup program's per-slot counters at scrape time.
struct SteeringCollector {
    kernel: Arc<Mutex<Kernel>>,
    connections: IntCounterVec,
}

impl SteeringCollector {
    fn family() -> IntCounterVec {
        IntCounterVec::new(
            Opts::new(
                "sentinel_steering_total",
                "Connections the sk_lookup program steered, by listener and reason (rule, watchlist, no_socket)",
            ),
            &["listener", "reason"],
        )
        .expect(STATIC)
    }
}

impl Collector for SteeringCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.connections.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self
            .kernel
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .steering
            .listener_stats();
        let connections = Self::family();
        for (listener, s) in &stats {
            for (reason, n) in [
                ("rule", s.rule),
                ("watchlist", s.watchlist),
                ("no_socket", s.no_socket),
            ] {
                connections
                    .with_label_values(&[listener.as_str(), reason])
                    .inc_by(n);
            }
        }
        connections.collect()
    }
}

/// Serves `/metrics` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        warn!(%error, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| respond(req, metrics.clone()));
                    if let Err(error) = http1::Builder::new()
                        .header_read_timeout(Duration::from_secs(10))
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        debug!(%error, "metrics connection ended");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
}

async fn respond(
    req: Request<Incoming>,
    metrics: Metrics,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: Vec<u8>| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            // Scraping reads maps with syscalls and may wait for the kernel
            // lock: keep it off the async workers.
            let body = tokio::task::spawn_blocking(move || metrics.encode())
                .await
                .unwrap_or_default();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"use GET\n".to_vec(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found; metrics are at /metrics\n".to_vec(),
        ),
    })
}
