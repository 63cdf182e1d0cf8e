//! `sentinel run`: wires configuration, kernel, admin API and metrics
//! together, and handles signals.
//!
//! SIGTERM and SIGINT stop the daemon: the XDP program is detached and the
//! admin socket removed; pinned maps stay, so the next start finds every
//! entry with its expiry. SIGHUP reloads the configuration: a file that does
//! not validate is logged and ignored; a valid one re-applies the static
//! lists, the port policy, TTL limits and the set of interfaces.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    admin,
    agents::kernel_push::KernelBridge,
    config::{Config, KernelConfig},
    kernel::{Kernel, SOURCE_CONFIG, clock},
    metrics::{self, Metrics},
    net::RuleList,
    profile::runtime::ProfileRuntime,
    proxy::Proxy,
};

/// TTL limits from the `kernel` block.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    /// `None`: entries added without a TTL never expire.
    pub default: Option<Duration>,
    pub max: Duration,
}

impl TtlPolicy {
    fn from_config(cfg: &KernelConfig) -> Self {
        Self {
            default: (cfg.default_ttl_seconds > 0)
                .then(|| Duration::from_secs(cfg.default_ttl_seconds)),
            max: Duration::from_secs(cfg.max_ttl_seconds),
        }
    }
}

/// What the admin API and metrics share.
pub struct State {
    pub kernel: Arc<Mutex<Kernel>>,
    pub metrics: Metrics,
    ttl: RwLock<TtlPolicy>,
    pub status: RwLock<Status>,
}

/// Answer of the admin `status` request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub config: PathBuf,
    pub pin_path: PathBuf,
    /// The bound metrics address (useful when configured with port 0).
    pub metrics_address: Option<SocketAddr>,
    /// Attached interfaces and their XDP mode.
    pub interfaces: Vec<(String, String)>,
    /// Proxy listeners and the addresses they are bound to.
    #[serde(default)]
    pub listeners: Vec<(String, SocketAddr)>,
    /// Admin requests beyond the first protocol that this daemon serves
    /// (`admin::FEATURE_IMPORT_PACKED`); absent from older daemons.
    #[serde(default)]
    pub features: Vec<String>,
}

impl State {
    /// The kernel, even if a thread panicked while holding it: its maps are
    /// kernel objects whose state is consistent after every syscall.
    pub fn lock_kernel(&self) -> MutexGuard<'_, Kernel> {
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_listeners(&self, listeners: Vec<(String, SocketAddr)>) {
        self.status
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .listeners = listeners;
    }

    pub fn ttl_policy(&self) -> TtlPolicy {
        *self.ttl.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Source label of list updates made by agents' kernel pushes.
pub const SOURCE_AGENT: &str = "agent";

impl KernelBridge for State {
    fn watch(
        &self,
        prefix: &ipnet::IpNet,
        ttl: Duration,
        source: &str,
        reason: &str,
    ) -> Result<Option<bool>, String> {
        self.watch_push(prefix, ttl, source, reason)
    }

    fn allowlisted(&self, ip: std::net::IpAddr, prefix: &ipnet::IpNet) -> bool {
        let kernel = self.lock_kernel();
        let now = clock::now_ns();
        match kernel.tables.entries(RuleList::Allow) {
            Ok(entries) => entries.iter().any(|(allowed, value)| {
                !value.is_expired(now)
                    && (allowed.contains(&ip)
                        || allowed.contains(&prefix.network())
                        || prefix.contains(&allowed.network()))
            }),
            // Unknown: refuse the push rather than risk denying an
            // allowlisted client.
            Err(e) => {
                warn!(error = %e, "cannot read the allowlist; refusing the kernel push");
                true
            }
        }
    }

    fn deny(
        &self,
        prefix: &ipnet::IpNet,
        ttl: Duration,
        source: &str,
        reason: &str,
    ) -> Result<bool, String> {
        let ttl = ttl.min(self.ttl_policy().max);
        let mut kernel = self.lock_kernel();
        if let Ok(Some(existing)) = kernel.tables.get(RuleList::Deny, prefix)
            && !crate::kernel::rules::text(&existing.source).starts_with("agent:")
        {
            // An operator's entry (config, admin) stays as it was written.
            return Ok(false);
        }
        let rule = crate::kernel::NewRule {
            ttl: Some(ttl),
            source: source.to_owned(),
            reason: reason.to_owned(),
        };
        let outcome = kernel.tables.upsert(RuleList::Deny, prefix, &rule);
        self.metrics.set_entries(&kernel.tables);
        drop(kernel);
        match outcome {
            Ok(upsert) => {
                let result = if upsert == crate::kernel::Upsert::Created {
                    "added"
                } else {
                    "replaced"
                };
                self.metrics.update(RuleList::Deny, SOURCE_AGENT, result, 1);
                Ok(true)
            }
            Err(e) => {
                self.metrics.update(
                    RuleList::Deny,
                    SOURCE_AGENT,
                    admin::server::result_label(&e),
                    1,
                );
                Err(e.to_string())
            }
        }
    }
}

impl State {
    fn watch_push(
        &self,
        prefix: &ipnet::IpNet,
        ttl: Duration,
        source: &str,
        reason: &str,
    ) -> Result<Option<bool>, String> {
        let ttl = ttl.min(self.ttl_policy().max);
        let mut kernel = self.lock_kernel();
        if !kernel.steering.quarantines() {
            return Ok(None);
        }
        if let Ok(Some(existing)) = kernel.steering.watch_get(prefix)
            && !crate::kernel::rules::text(&existing.source).starts_with("agent:")
        {
            return Ok(Some(false));
        }
        let rule = crate::kernel::NewRule {
            ttl: Some(ttl),
            source: source.to_owned(),
            reason: reason.to_owned(),
        };
        kernel
            .steering
            .watch_upsert(prefix, &rule)
            .map(|_| Some(true))
            .map_err(|e| e.to_string())
    }
}

/// Applies the parts of the `kernel` block that can change at run time.
fn apply_kernel_config(state: &State, cfg: &KernelConfig) -> anyhow::Result<()> {
    *state.ttl.write().unwrap_or_else(|p| p.into_inner()) = TtlPolicy::from_config(cfg);
    let mut kernel = state.lock_kernel();
    for (list, rules) in [
        (RuleList::Allow, &cfg.allowlist),
        (RuleList::Deny, &cfg.denylist),
    ] {
        let report = kernel
            .sync_static(list, rules)
            .with_context(|| format!("cannot apply the static {list}"))?;
        state
            .metrics
            .update(list, SOURCE_CONFIG, "added", report.added as u64);
        state
            .metrics
            .update(list, SOURCE_CONFIG, "replaced", report.kept as u64);
        state
            .metrics
            .update(list, SOURCE_CONFIG, "removed", report.removed as u64);
        info!(%list, added = report.added, kept = report.kept, removed = report.removed, "static entries applied");
    }
    kernel.set_port_policy(&cfg.port_policy)?;
    state.metrics.set_entries(&kernel.tables);

    // Interfaces: attach new ones, detach those no longer listed.
    let attached = kernel.attached();
    for (iface, _) in &attached {
        if !cfg.interfaces.contains(iface) {
            kernel.detach(iface);
        }
    }
    for iface in &cfg.interfaces {
        kernel
            .attach(iface, cfg.xdp_mode)
            .with_context(|| format!("cannot protect interface '{iface}'"))?;
    }
    let interfaces = kernel
        .attached()
        .into_iter()
        .map(|(i, m)| (i, m.to_owned()))
        .collect();
    state
        .status
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .interfaces = interfaces;
    Ok(())
}

/// Steers as `config` says: the rules of `kernel.steering` and the
/// quarantine listener, with the proxy's listening sockets. Attaches the
/// sk_lookup program when something is steered, detaches it otherwise.
fn apply_steering(state: &State, config: &Config, proxy: &Proxy) -> anyhow::Result<()> {
    use crate::kernel::steer::{PlanListener, PlanRule, Steering};
    let sockets = proxy.sockets();
    let listeners: Vec<PlanListener<'_>> = sockets
        .iter()
        .map(|s| PlanListener {
            name: s.name,
            bound: s.bound,
            quarantine: config
                .listeners
                .iter()
                .any(|l| l.name == s.name && l.quarantine),
            dual_stack: crate::kernel::steer::dual_stack(s.bound, &s.socket),
        })
        .collect();
    let rules: Vec<PlanRule<'_>> = config
        .kernel
        .steering
        .iter()
        .map(|r| PlanRule {
            listener: &r.listener,
            prefix: r.prefix,
            ports: r.ports,
            protocol: r.protocol,
        })
        .collect();
    let plan = Steering::plan(&rules, &listeners);
    let fds: Vec<(&str, std::os::fd::BorrowedFd<'_>)> =
        sockets.iter().map(|s| (s.name, s.socket)).collect();
    let mut kernel = state.lock_kernel();
    kernel
        .steering
        .apply(&plan, &fds)
        .context("cannot apply the steering rules")?;
    if plan.is_empty() {
        kernel.detach_steering();
    } else {
        kernel.attach_steering()?;
    }
    info!(
        rules = plan.targets.len(),
        quarantine = plan.quarantine.as_deref().unwrap_or("none"),
        "steering applied"
    );
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    // Claim the admin socket first: a second daemon on the same socket
    // must stop before it touches the shared kernel state.
    let admin_path = config.admin.socket.clone();
    let admin_listener = admin::server::bind(&admin_path)?;
    let started = start(config_path, &config, admin_listener).await;
    if started.is_err() {
        let _ = std::fs::remove_file(&admin_path);
    }
    started
}

async fn start(
    config_path: &Path,
    config: &Config,
    admin_listener: tokio::net::UnixListener,
) -> anyhow::Result<()> {
    let kernel = blocking(|| Kernel::open(&config.kernel))?;
    let kernel = Arc::new(Mutex::new(kernel));
    let metrics = Metrics::new();
    metrics.register_kernel(kernel.clone());

    let metrics_listener = match config.observability.metrics_address {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };
    let state = Arc::new(State {
        kernel,
        metrics: metrics.clone(),
        ttl: RwLock::new(TtlPolicy::from_config(&config.kernel)),
        status: RwLock::new(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            config: config_path.to_owned(),
            pin_path: config.kernel.pin_path.clone(),
            metrics_address: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
            interfaces: Vec::new(),
            listeners: Vec::new(),
            features: vec![crate::admin::FEATURE_IMPORT_PACKED.to_owned()],
        }),
    });
    blocking(|| apply_kernel_config(&state, &config.kernel))?;
    let profile = blocking(|| ProfileRuntime::start(&config.profile, &state.metrics.profile))
        .context("profile")?;
    let deps = crate::proxy::Deps {
        metrics: state.metrics.proxy.clone(),
        agent_metrics: state.metrics.agents.clone(),
        kernel: Some(state.clone() as Arc<dyn KernelBridge>),
        facts: Some(profile.facts()),
        store: profile.store(),
    };
    let mut proxy = Proxy::start(config, deps).await?;
    state.set_listeners(proxy.bound());
    blocking(|| apply_steering(&state, config, &proxy))?;

    let admin_path = config.admin.socket.clone();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(admin::server::serve(
        admin_listener,
        state.clone(),
        shutdown_rx.clone(),
    )));
    if let Some(listener) = metrics_listener {
        info!(address = %listener.local_addr()?, "metrics at /metrics");
        tasks.push(tokio::spawn(metrics::serve(
            listener,
            metrics,
            shutdown_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(reaper(
        state.clone(),
        Duration::from_millis(config.kernel.reap_interval_ms),
        shutdown_rx.clone(),
    )));
    info!(admin = %admin_path.display(), "sentinel running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut running = config.clone();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Some(config) = reload(&state, &mut proxy, config_path, &running).await {
                    profile.check_reload(&config.profile);
                    running = config;
                }
            }
        }
    }

    // Steering goes first: from here on every connection reaches the
    // socket the kernel would have picked without Sentinel.
    state.lock_kernel().detach_steering();
    info!(
        deadline_secs = running.system.graceful_shutdown_timeout.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    proxy
        .shutdown(running.system.graceful_shutdown_timeout)
        .await;
    // Every record of a drained request has been pushed: now it is written.
    profile.shutdown().await;
    let _ = shutdown_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    state.lock_kernel().detach_all();
    let _ = std::fs::remove_file(&admin_path);
    info!("stopped; pinned maps kept for the next start");
    Ok(())
}

/// SIGHUP: validate the file, then apply what can change at run time.
/// Returns the configuration now running, when it changed.
async fn reload(state: &State, proxy: &mut Proxy, path: &Path, running: &Config) -> Option<Config> {
    info!(config = %path.display(), "reloading configuration");
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            error!("configuration not reloaded, the running one stays:\n{e}");
            return None;
        }
    };
    // The proxy first: its new generation is built whole (TLS files read,
    // listeners bound) before anything changes, so a failure leaves the
    // running configuration in place.
    if let Err(e) = proxy.reload(&config).await {
        error!("configuration not reloaded, the running one stays: {e:#}");
        return None;
    }
    state.set_listeners(proxy.bound());
    if config.kernel.pin_path != running.kernel.pin_path
        || config.kernel.capacity != running.kernel.capacity
    {
        warn!("kernel.pin-path and kernel.capacity take effect at the next start");
    }
    if config.admin != running.admin || config.observability != running.observability {
        warn!("the admin socket and metrics address take effect at the next start");
    }
    if config.system.worker_threads != running.system.worker_threads {
        warn!("system.worker-threads takes effect at the next start");
    }
    let applied = blocking(|| {
        apply_kernel_config(state, &config.kernel)?;
        apply_steering(state, &config, proxy)
    });
    match applied {
        Ok(()) => info!("configuration reloaded"),
        Err(e) => error!("configuration reload failed part way: {e:#}"),
    }
    Some(config)
}

/// Removes expired entries every `every`.
async fn reaper(state: Arc<State>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let state = state.clone();
        let reaped = tokio::task::spawn_blocking(move || {
            let mut kernel = state.lock_kernel();
            let now = clock::now_ns();
            let result = kernel.tables.reap(now);
            let watch = kernel.steering.watch_reap(now);
            state.metrics.set_entries(&kernel.tables);
            drop(kernel);
            match watch {
                Ok(reaped) => {
                    for prefix in &reaped {
                        info!(list = "watchlist", %prefix, "expired entry removed");
                    }
                }
                Err(e) => warn!(error = %e, "reaping expired watchlist entries failed"),
            }
            match result {
                Ok(reaped) => {
                    for (list, prefix) in &reaped {
                        state.metrics.update(*list, "reaper", "expired", 1);
                        info!(%list, %prefix, "expired entry removed");
                    }
                }
                Err(e) => warn!(error = %e, "reaping expired entries failed"),
            }
        })
        .await;
        if let Err(e) = reaped {
            warn!(error = %e, "reaper task failed");
        }
    }
}

/// Runs blocking kernel work from the daemon's async code: with
/// `block_in_place` on a multi-thread runtime, whose other workers serve
/// requests meanwhile; in place on the current-thread runtime of
/// `worker-threads 1`, whose one thread is the daemon's.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
