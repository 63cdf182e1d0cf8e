//! The reverse proxy: listeners accept connections (`listener`), each
//! request is routed (`router`) and forwarded (`handler`, `forward`) to an
//! upstream target (`upstream`, `health`), with TLS on both sides (`tls`).
//!
//! Configuration lives in an immutable [`Snapshot`] behind an `ArcSwap`: a
//! request loads it once and keeps it to the end, so a reload applies to
//! new requests without disturbing those in flight. Listeners that stay
//! across a reload keep their sockets; their TLS settings and timeouts come
//! from the snapshot at each accept.

mod body;
mod errors;
mod exchange;
mod forward;
mod h1;
mod handler;
mod health;
mod idle;
mod listener;
mod pool;
mod profile;
pub mod record;
mod router;
mod server;
pub(crate) mod tls;
mod upstream;

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use body::BoxError;
pub use errors::{ProxyError, chain as error_chain};
use router::{Action, Route, Router};
use upstream::Upstream;

use crate::{
    agents::{
        Agents,
        challenge::Challenges,
        kernel_push::KernelBridge,
        metrics::AgentMetrics,
        pipeline::{self, AgentContext, RouteAgents},
    },
    config::{Config, LimitsConfig, ListenerConfig},
    metrics::ProxyMetrics,
};

/// Bodies on the proxy path, both directions.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A listener's settings of one configuration generation.
pub struct ListenerSpec {
    pub config: ListenerConfig,
    pub tls: Option<TlsAcceptor>,
    /// This listener's own connection cap, when it has one.
    pub connections: Option<Arc<Semaphore>>,
}

/// Everything a request needs from the configuration, frozen.
pub struct Snapshot {
    pub router: Router,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub limits: LimitsConfig,
    pub listeners: HashMap<String, Arc<ListenerSpec>>,
    pub access_log: bool,
    pub agents: Agents,
    /// Each route's filters, for routes that have some.
    pub route_agents: HashMap<String, Arc<RouteAgents>>,
    pub agent_context: Arc<AgentContext>,
    /// Each route's profile mode and secure headers.
    pub profiles: profile::Profiles,
    /// Builds requests' metadata records, when they go anywhere.
    pub recorder: Option<Arc<record::Recorder>>,
}

impl Snapshot {
    /// Builds a generation from `config`, reusing `previous`'s upstreams
    /// whose configuration did not change (their health state and pools
    /// carry over) and their listeners' connection caps.
    fn build(config: &Config, previous: Option<&Snapshot>, deps: &Deps) -> anyhow::Result<Self> {
        let metrics = &deps.metrics;
        let mut upstreams = HashMap::new();
        for cfg in &config.upstreams {
            let reused = previous
                .and_then(|p| p.upstreams.get(&cfg.name))
                .filter(|u| u.config == *cfg)
                .cloned();
            let upstream = match reused {
                Some(u) => u,
                None => {
                    let u = Upstream::new(cfg, metrics)
                        .with_context(|| format!("upstream '{}'", cfg.name))?;
                    if cfg.health_check.is_some() {
                        tokio::spawn(health::run(Arc::downgrade(&u)));
                    }
                    u
                }
            };
            upstreams.insert(cfg.name.clone(), upstream);
        }

        let mut routes = Vec::new();
        for cfg in &config.routes {
            let action = match (&cfg.upstream, &cfg.static_response) {
                (Some(name), _) => Action::Forward(
                    upstreams
                        .get(name)
                        .cloned()
                        .with_context(|| format!("route '{}': no upstream '{name}'", cfg.name))?,
                ),
                (None, Some(response)) => Action::Respond(response.clone()),
                (None, None) => anyhow::bail!(
                    "route '{}' has neither upstream nor static-response",
                    cfg.name
                ),
            };
            routes.push((cfg.priority, Route::new(cfg, action)));
        }

        let mut listeners = HashMap::new();
        for cfg in &config.listeners {
            let tls = match &cfg.tls {
                Some(t) => Some(TlsAcceptor::from(
                    tls::server_config(t).with_context(|| format!("listener '{}'", cfg.name))?,
                )),
                None => None,
            };
            let connections = cfg.max_connections.map(|max| {
                previous
                    .and_then(|p| p.listeners.get(&cfg.name))
                    .filter(|l| l.config.max_connections == Some(max))
                    .and_then(|l| l.connections.clone())
                    .unwrap_or_else(|| Arc::new(Semaphore::new(max)))
            });
            listeners.insert(
                cfg.name.clone(),
                Arc::new(ListenerSpec {
                    config: cfg.clone(),
                    tls,
                    connections,
                }),
            );
        }

        let agents = Agents::build(config, previous.map(|p| &p.agents), &deps.agent_metrics)
            .context("agents")?;
        let challenges = match previous {
            Some(p) => p
                .agent_context
                .challenges
                .reconfigured(&config.waf.challenge),
            None => Challenges::new(&config.waf.challenge),
        }
        .context("waf.challenge")?;
        let agent_context = Arc::new(AgentContext {
            metrics: deps.agent_metrics.clone(),
            kernel: deps.kernel.clone(),
            challenges,
            waf: config.waf.clone(),
        });
        Ok(Self {
            router: Router::new(routes),
            upstreams,
            limits: config.limits.clone(),
            listeners,
            access_log: config.observability.access_log.enabled,
            route_agents: pipeline::route_agents(config, &agents),
            agents,
            agent_context,
            profiles: profile::Profiles::new(config),
            recorder: deps.facts.clone().map(|facts| {
                Arc::new(record::Recorder::new(
                    &config.profile.metadata,
                    facts,
                    deps.store.clone(),
                ))
            }),
        })
    }
}

/// What the proxy needs from the rest of the daemon.
#[derive(Clone)]
pub struct Deps {
    pub metrics: ProxyMetrics,
    pub agent_metrics: AgentMetrics,
    /// The kernel denylist, for agents' kernel pushes; `None` in tools and
    /// tests that run the proxy alone.
    pub kernel: Option<Arc<dyn KernelBridge>>,
    /// Client and host facts for metadata records; `None`: no records.
    pub facts: Option<Arc<dyn record::Facts>>,
    /// The local store of records, when `profile { store }` is set.
    pub store: Option<crate::profile::store::StoreHandle>,
}

/// What every connection and request shares.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: ProxyMetrics,
    pub deps: Deps,
    /// `system.max-connections`, over all listeners.
    pub connections: Arc<Semaphore>,
    /// Turns true when the daemon stops: connections finish their current
    /// request and close.
    pub draining: watch::Receiver<bool>,
    /// Parked keep-alive connections, held without a task until their
    /// clients send again.
    idle: idle::Idle<listener::Parked>,
}

struct RunningListener {
    address: SocketAddr,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    /// A duplicate of the listening socket's descriptor, for the kernel's
    /// steering map (the accept loop owns the socket itself).
    socket: OwnedFd,
}

/// A running listener's socket, as the steering program needs it.
pub struct ListenerSocket<'a> {
    pub name: &'a str,
    pub bound: SocketAddr,
    pub socket: BorrowedFd<'a>,
}

/// The running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: HashMap<String, RunningListener>,
    tracker: TaskTracker,
    drain: watch::Sender<bool>,
    max_connections: usize,
}

impl Proxy {
    /// Binds every listener and starts serving.
    pub async fn start(config: &Config, deps: Deps) -> anyhow::Result<Self> {
        let snapshot = Snapshot::build(config, None, &deps)?;
        let (drain, draining) = watch::channel(false);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics: deps.metrics.clone(),
            deps,
            connections: Arc::new(Semaphore::new(config.system.max_connections)),
            draining,
            idle: idle::Idle::new().context("cannot create the idle connections' epoll set")?,
        });
        let tracker = TaskTracker::new();
        tracker.spawn(listener::watch_idle(shared.clone(), tracker.clone()));
        let mut proxy = Self {
            shared,
            listeners: HashMap::new(),
            tracker,
            drain,
            max_connections: config.system.max_connections,
        };
        for cfg in &config.listeners {
            proxy.open(cfg).await?;
        }
        Ok(proxy)
    }

    async fn open(&mut self, cfg: &ListenerConfig) -> anyhow::Result<()> {
        let socket = TcpListener::bind(cfg.address).await.with_context(|| {
            format!("listener '{}': cannot listen on {}", cfg.name, cfg.address)
        })?;
        let bound = socket.local_addr()?;
        let dup = socket
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("listener '{}': cannot duplicate its socket", cfg.name))?;
        let (stop, stopped) = watch::channel(false);
        info!(listener = %cfg.name, address = %bound, protocol = ?cfg.protocol, "listening");
        self.tracker.spawn(listener::accept_loop(
            cfg.name.clone(),
            socket,
            self.shared.clone(),
            stopped,
            self.tracker.clone(),
        ));
        self.listeners.insert(
            cfg.name.clone(),
            RunningListener {
                address: cfg.address,
                bound,
                stop,
                socket: dup,
            },
        );
        Ok(())
    }

    /// Listener names and the addresses they are bound to (useful when
    /// configured with port 0).
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        let mut out: Vec<_> = self
            .listeners
            .iter()
            .map(|(name, l)| (name.clone(), l.bound))
            .collect();
        out.sort();
        out
    }

    /// Every running listener's socket.
    pub fn sockets(&self) -> Vec<ListenerSocket<'_>> {
        let mut out: Vec<_> = self
            .listeners
            .iter()
            .map(|(name, l)| ListenerSocket {
                name,
                bound: l.bound,
                socket: l.socket.as_fd(),
            })
            .collect();
        out.sort_by_key(|l| l.name);
        out
    }

    /// Applies a new, already validated configuration: new routes, upstreams
    /// and listener settings serve new requests; in-flight requests finish
    /// on the generation they started with. Listeners that remain keep
    /// their sockets, new ones are opened, removed ones stop accepting and
    /// drain. On an error nothing changes.
    pub async fn reload(&mut self, config: &Config) -> anyhow::Result<()> {
        let previous = self.shared.snapshot.load_full();
        let next = Snapshot::build(config, Some(&previous), &self.shared.deps)?;

        // Open new listeners first: if one cannot bind, the old
        // configuration stays whole.
        let mut opened = Vec::new();
        for cfg in &config.listeners {
            let same = self
                .listeners
                .get(&cfg.name)
                .is_some_and(|l| l.address == cfg.address);
            if !same {
                let previous_on_name = self.listeners.remove(&cfg.name);
                if let Err(e) = self.open(cfg).await {
                    for name in opened {
                        if let Some(l) = self.listeners.remove(&name) {
                            let _ = l.stop.send(true);
                        }
                    }
                    if let Some(p) = previous_on_name {
                        self.listeners.insert(cfg.name.clone(), p);
                    }
                    return Err(e);
                }
                if let Some(p) = previous_on_name {
                    // Same name, new address: the old socket drains.
                    let _ = p.stop.send(true);
                }
                opened.push(cfg.name.clone());
            }
        }
        let wanted: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        let gone: Vec<String> = self
            .listeners
            .keys()
            .filter(|name| !wanted.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(l) = self.listeners.remove(&name) {
                info!(listener = %name, address = %l.bound, "listener removed; its connections drain");
                let _ = l.stop.send(true);
            }
        }
        if config.system.max_connections != self.max_connections {
            warn!("system.max-connections takes effect at the next start");
        }
        self.shared.snapshot.store(Arc::new(next));
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish for up to `deadline`,
    /// then returns (the remaining connections are dropped with the
    /// runtime).
    pub async fn shutdown(mut self, deadline: Duration) {
        // Dropping each listener closes the descriptor kept for steering:
        // once the accept loop drops its own, the socket stops listening
        // and new connections are refused.
        for (_, l) in self.listeners.drain() {
            let _ = l.stop.send(true);
        }
        let _ = self.drain.send(true);
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                deadline_secs = deadline.as_secs_f64(),
                "connections still open at the shutdown deadline; closing them"
            );
        }
    }
}
