//! Upstreams: their targets, how one is picked, whether it is healthy, and
//! the pooled client that carries requests to them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use prometheus::{IntCounter, IntGauge};
use tracing::{info, warn};

use super::{
    ProxyBody,
    forward::{self, Forwarded},
    h1::RawFields,
    pool::{ClientError, Driven, Pool},
    tls,
};
use crate::{
    config::{LoadBalancing, UpstreamConfig, UpstreamProtocol},
    metrics::ProxyMetrics,
};

/// Results of an attempt, the `result` label of
/// `sentinel_upstream_requests_total`.
pub const RESULTS: [&str; 9] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "connect_error",
    "timeout",
    "client_timeout",
    "error",
];

/// How requests reach an upstream's targets: HTTP/1.1 connections pooled
/// per target and driven by the requests themselves ([`Pool`]), or
/// hyper-util's client for HTTP/2 (one multiplexed connection per target).
pub enum HttpClient {
    Http1(Arc<Pool>),
    Http2(Box<Client<HttpsConnector<HttpConnector>, ProxyBody>>),
}

impl HttpClient {
    /// Sends `req` (its URI names the target) and waits for the response
    /// head; the body streams from the returned response.
    pub async fn request(&self, req: Request<ProxyBody>) -> Result<Response<Driven>, ClientError> {
        let (parts, body) = req.into_parts();
        self.send(&parts, &Forwarded::none(), body, false)
            .await
            .map(|(response, _)| response)
    }

    /// [`request`](Self::request) with the head borrowed, so that a
    /// request retried on another target needs no copy of it, and with
    /// the forwarding fields to add. The response comes without its
    /// hop-by-hop fields, except for a switch of protocols (101), which
    /// keeps its handshake for the client.
    pub async fn send(
        &self,
        parts: &http::request::Parts,
        forwarded: &Forwarded,
        body: ProxyBody,
        raw: bool,
    ) -> Result<(Response<Driven>, Option<RawFields>), ClientError> {
        match self {
            HttpClient::Http1(pool) => pool.send(parts, forwarded, body, raw).await,
            HttpClient::Http2(client) => {
                let mut req = Request::from_parts(parts.clone(), body);
                forwarded.apply(req.headers_mut());
                match client.request(req).await {
                    Ok(mut response) => {
                        forward::strip_hop_by_hop(response.headers_mut(), None);
                        Ok((response.map(Driven::detached), None))
                    }
                    Err(source) => Err(ClientError::Pooled { source }),
                }
            }
        }
    }
}

/// One backend address of an upstream.
pub struct Target {
    /// `host:port` as configured.
    pub address: String,
    /// `http://host:port` or `https://host:port`.
    pub base: String,
    /// `base`'s scheme and authority, parsed once: requests' URIs are put
    /// together from them without formatting or parsing.
    scheme: http::uri::Scheme,
    authority: Option<http::uri::Authority>,
    /// Active health check verdict (true until a check says otherwise).
    active_healthy: AtomicBool,
    /// Consecutive failed requests, for passive ejection.
    failures: AtomicU32,
    /// While ejected: milliseconds since the upstream's epoch at which the
    /// target may be tried again; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// Requests in flight, for least-connections.
    pub in_flight: AtomicUsize,
    /// Consecutive active-check results in the current direction.
    check_streak: AtomicU32,
    health_gauge: IntGauge,
}

impl Target {
    pub fn active_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    /// The URI of a request for `path_and_query` (`/` when `None`) on this
    /// target. The path was validated when the request was parsed and is
    /// shared, not copied; anything but an origin-form path (`*`, say) is
    /// formatted and parsed whole, which refuses what cannot be forwarded.
    pub fn uri_for(
        &self,
        path_and_query: Option<&http::uri::PathAndQuery>,
    ) -> Result<Uri, http::uri::InvalidUri> {
        let origin_form = path_and_query.is_none_or(|pq| pq.as_str().starts_with('/'));
        if let (true, Some(authority)) = (origin_form, &self.authority) {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(authority.clone());
            parts.path_and_query = Some(
                path_and_query
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            if let Ok(uri) = Uri::from_parts(parts) {
                return Ok(uri);
            }
        }
        let path_and_query = path_and_query.map_or("/", |pq| pq.as_str());
        format!("{}{path_and_query}", self.base).parse()
    }
}

/// An upstream of one configuration generation. A reload that leaves an
/// upstream's configuration unchanged keeps this object, and with it the
/// targets' health and the connection pool.
pub struct Upstream {
    pub name: String,
    pub config: UpstreamConfig,
    pub targets: Vec<Target>,
    pub client: HttpClient,
    /// `sentinel_upstream_requests_total{upstream=name}`, one counter per
    /// result, resolved once rather than per request.
    results: Vec<(&'static str, IntCounter)>,
    /// Round-robin order, each target repeated by its weight, interleaved.
    schedule: Vec<usize>,
    next: AtomicUsize,
    epoch: Instant,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, metrics: &ProxyMetrics) -> anyhow::Result<Arc<Self>> {
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let targets: Vec<Target> = cfg
            .targets
            .iter()
            .map(|t| {
                let gauge = metrics
                    .upstream_health
                    .with_label_values(&[cfg.name.as_str(), t.address.as_str()]);
                gauge.set(1);
                Target {
                    address: t.address.clone(),
                    base: format!("{scheme}://{}", t.address),
                    scheme: if cfg.tls.is_some() {
                        http::uri::Scheme::HTTPS
                    } else {
                        http::uri::Scheme::HTTP
                    },
                    authority: t.address.parse().ok(),
                    active_healthy: AtomicBool::new(true),
                    failures: AtomicU32::new(0),
                    ejected_until_ms: AtomicU64::new(0),
                    in_flight: AtomicUsize::new(0),
                    check_streak: AtomicU32::new(0),
                    health_gauge: gauge,
                }
            })
            .collect();
        let max_weight = cfg.targets.iter().map(|t| t.weight).max().unwrap_or(1);
        let mut schedule = Vec::new();
        for round in 0..max_weight {
            for (i, t) in cfg.targets.iter().enumerate() {
                if t.weight > round {
                    schedule.push(i);
                }
            }
        }

        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(cfg.timeouts.connect));
        http.set_nodelay(true);
        http.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(cfg.tls.as_ref())?)
            .https_or_http();
        let builder = match &cfg.tls.as_ref().and_then(|t| t.sni.clone()) {
            Some(name) => {
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                    rustls_pki_types::ServerName::try_from(name.clone())
                        .map_err(|e| anyhow::anyhow!("tls sni '{name}': {e}"))?,
                ))
            }
            None => builder,
        };
        let client = match cfg.protocol {
            UpstreamProtocol::Http1 => {
                let bases: Vec<Uri> = targets.iter().filter_map(|t| t.base.parse().ok()).collect();
                HttpClient::Http1(Arc::new(Pool::new(
                    builder.enable_http1().wrap_connector(http),
                    &bases,
                    cfg.pool.max_idle,
                    cfg.pool.idle_timeout,
                )))
            }
            UpstreamProtocol::Http2 => {
                let mut client = Client::builder(TokioExecutor::new());
                client
                    .pool_max_idle_per_host(cfg.pool.max_idle)
                    .pool_idle_timeout(cfg.pool.idle_timeout)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .http2_only(true);
                HttpClient::Http2(Box::new(
                    client.build(builder.enable_http2().wrap_connector(http)),
                ))
            }
        };
        Ok(Arc::new(Self {
            name: cfg.name.clone(),
            config: cfg.clone(),
            targets,
            client,
            results: RESULTS
                .iter()
                .map(|r| {
                    let counter = metrics
                        .upstream_requests
                        .with_label_values(&[cfg.name.as_str(), r]);
                    (*r, counter)
                })
                .collect(),
            schedule,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        }))
    }

    /// Counts one attempt under `result` (one of [`RESULTS`]).
    pub fn count(&self, result: &str) {
        if let Some((_, counter)) = self.results.iter().find(|(r, _)| *r == result) {
            counter.inc();
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a target may take requests now.
    pub fn available(&self, index: usize) -> bool {
        let t = &self.targets[index];
        if !t.active_healthy() {
            return false;
        }
        let until = t.ejected_until_ms.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    /// A target for the next attempt, skipping those already `tried` and
    /// those unhealthy or ejected; `None` when none is left.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let candidate = |i: &usize| !tried.contains(i) && self.available(*i);
        match self.config.load_balancing {
            LoadBalancing::RoundRobin => {
                let n = self.schedule.len();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| self.schedule[(start + k) % n])
                    .find(|i| candidate(i))
            }
            LoadBalancing::LeastConnections => {
                // Ties go round-robin, so equal targets share the load.
                let n = self.targets.len();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|i| candidate(i))
                    .min_by_key(|i| self.targets[*i].in_flight.load(Ordering::Relaxed))
            }
        }
    }

    /// Passive health: a request to `index` failed.
    pub fn record_failure(&self, index: usize) {
        let t = &self.targets[index];
        let passive = &self.config.passive_health;
        let failures = t.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= passive.consecutive_failures {
            t.failures.store(0, Ordering::Relaxed);
            let until = self.now_ms() + passive.ejection_time.as_millis() as u64;
            t.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
            t.health_gauge.set(0);
            warn!(
                upstream = %self.name,
                target = %t.address,
                failures,
                ejection_secs = passive.ejection_time.as_secs_f64(),
                "target ejected after consecutive failures"
            );
        }
    }

    /// Passive health: a request to `index` succeeded.
    pub fn record_success(&self, index: usize) {
        let t = &self.targets[index];
        t.failures.store(0, Ordering::Relaxed);
        if t.ejected_until_ms.swap(0, Ordering::Relaxed) != 0 {
            info!(upstream = %self.name, target = %t.address, "ejected target answered again");
            t.health_gauge.set(i64::from(t.active_healthy()));
        }
    }

    /// Active health: one probe result for `index`.
    pub fn record_check(&self, index: usize, ok: bool) {
        let Some(check) = &self.config.health_check else {
            return;
        };
        let t = &self.targets[index];
        let healthy = t.active_healthy();
        if ok == healthy {
            t.check_streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = t.check_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = if healthy {
            check.unhealthy_threshold
        } else {
            check.healthy_threshold
        };
        if streak >= threshold {
            t.check_streak.store(0, Ordering::Relaxed);
            t.active_healthy.store(ok, Ordering::Relaxed);
            if ok {
                // A target the checks bring back starts with a clean slate.
                t.ejected_until_ms.store(0, Ordering::Relaxed);
                t.failures.store(0, Ordering::Relaxed);
                info!(upstream = %self.name, target = %t.address, "target healthy again");
            } else {
                warn!(upstream = %self.name, target = %t.address, "target failed its health checks");
            }
            t.health_gauge.set(i64::from(ok));
        }
    }

    /// Seconds an ejected target has left, for tests and status.
    pub fn ejected(&self, index: usize) -> Option<Duration> {
        let until = self.targets[index].ejected_until_ms.load(Ordering::Relaxed);
        let now = self.now_ms();
        (until != 0 && until > now).then(|| Duration::from_millis(until - now))
    }
}

/// Counts a request in flight on a target for as long as it lives.
pub struct InFlight {
    upstream: Arc<Upstream>,
    index: usize,
}

impl InFlight {
    pub fn new(upstream: Arc<Upstream>, index: usize) -> Self {
        upstream.targets[index]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Self { upstream, index }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.targets[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TargetConfig, UpstreamConfig};

    fn upstream(lb: LoadBalancing, weights: &[u32]) -> Arc<Upstream> {
        let cfg = UpstreamConfig {
            name: "u".into(),
            targets: weights
                .iter()
                .enumerate()
                .map(|(i, w)| TargetConfig {
                    address: format!("127.0.0.1:{}", 1000 + i),
                    weight: *w,
                })
                .collect(),
            load_balancing: lb,
            protocol: UpstreamProtocol::Http1,
            tls: None,
            health_check: None,
            passive_health: Default::default(),
            timeouts: Default::default(),
            retries: 1,
            pool: Default::default(),
        };
        Upstream::new(&cfg, &ProxyMetrics::new(&prometheus::Registry::new()))
            .expect("upstream builds")
    }

    #[test]
    fn request_uris_keep_path_and_query() {
        let u = upstream(LoadBalancing::RoundRobin, &[1]);
        let t = &u.targets[0];
        let pq = |s: &str| s.parse::<http::uri::PathAndQuery>().expect("path");
        let uri = |p: Option<&str>| t.uri_for(p.map(pq).as_ref()).map(|u| u.to_string()).ok();
        assert_eq!(
            uri(Some("/a/b?c=1&d")).as_deref(),
            Some("http://127.0.0.1:1000/a/b?c=1&d")
        );
        assert_eq!(uri(None).as_deref(), Some("http://127.0.0.1:1000/"));
        // Not origin-form: formatted and parsed whole, as before.
        let whole = format!("{}*", t.base)
            .parse::<Uri>()
            .ok()
            .map(|u| u.to_string());
        assert_eq!(uri(Some("*")), whole);
    }

    #[test]
    fn round_robin_follows_weights() {
        let u = upstream(LoadBalancing::RoundRobin, &[1, 3]);
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[u.pick(&[]).expect("a target")] += 1;
        }
        assert_eq!(counts, [100, 300]);
    }

    #[test]
    fn least_connections_prefers_idle_targets() {
        let u = upstream(LoadBalancing::LeastConnections, &[1, 1, 1]);
        let _a = InFlight::new(u.clone(), 0);
        let _b = InFlight::new(u.clone(), 0);
        let _c = InFlight::new(u.clone(), 2);
        for _ in 0..10 {
            assert_eq!(u.pick(&[]), Some(1));
        }
        assert_eq!(u.pick(&[1]), Some(2));
    }

    #[test]
    fn passive_ejection_and_return() {
        let u = upstream(LoadBalancing::RoundRobin, &[1, 1]);
        for _ in 0..5 {
            u.record_failure(0);
        }
        assert!(u.ejected(0).is_some());
        for _ in 0..10 {
            assert_eq!(u.pick(&[]), Some(1));
        }
        assert_eq!(u.pick(&[1]), None);
        u.record_success(0);
        assert!(u.ejected(0).is_none());
        assert!(u.available(0));
    }
}
