//! The profile's background machinery as the daemon runs it: the host
//! sampler, the local store's writer and the collector's shipper, started
//! from `profile { ... }` and stopped in order on shutdown.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use tokio::{sync::oneshot, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    client,
    host::{HostInfo, HostSampler, HostSnapshot},
    json::JsonObject,
    metrics::ProfileMetrics,
    shipper::{Shipper, ShipperHandle, ShipperOptions, ShipperTls},
    store::{Store, StoreHandle, StoreOptions},
};
use crate::{
    config::{CollectorConfig, ProfileConfig, StoreConfig},
    proxy::record::Facts,
};

/// User-Agents whose parse is kept: real traffic has few distinct ones.
const USER_AGENT_CACHE: usize = 4096;

/// Client facts from the User-Agent (parsed once per distinct one) and
/// the address, host facts from the latest sample; both kept serialized,
/// so a record copies them rather than building them again.
struct SystemFacts {
    host: HostInfo,
    /// The latest sample and its JSON, made again when the sample changes.
    host_json: Mutex<Option<(Arc<HostSnapshot>, Vec<u8>)>>,
    /// User-Agent (absent: empty) to its members, serialized; emptied
    /// when full. Looked up once per record: foldhash (seeded per process,
    /// as the names are the clients') rather than SipHash, which took half
    /// the lookup's time on a browser's User-Agent.
    parsed: Mutex<HashMap<Box<str>, Vec<u8>, foldhash::fast::RandomState>>,
}

impl Facts for SystemFacts {
    fn client(&self, ip: IpAddr, user_agent: Option<&str>, out: &mut JsonObject<'_>) {
        let user_agent = user_agent.unwrap_or_default();
        {
            let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
            match parsed.get(user_agent) {
                Some(members) => out.members(members),
                None => {
                    let members = user_agent_members(user_agent);
                    out.members(&members);
                    if parsed.len() >= USER_AGENT_CACHE {
                        parsed.clear();
                    }
                    parsed.insert(user_agent.into(), members);
                }
            }
        }
        out.value("network_type", &client::network_type(ip));
    }

    fn host(&self, out: &mut Vec<u8>) {
        let latest = self.host.snapshot();
        let mut cached = self.host_json.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((sample, json)) if Arc::ptr_eq(sample, &latest) => out.extend_from_slice(json),
            _ => {
                let json = serde_json::to_vec(&*latest).unwrap_or_else(|_| b"null".to_vec());
                out.extend_from_slice(&json);
                *cached = Some((latest, json));
            }
        }
    }
}

/// The `client` members a User-Agent gives, serialized without braces.
fn user_agent_members(user_agent: &str) -> Vec<u8> {
    let ua = client::parse_user_agent(user_agent);
    let mut out = Vec::new();
    let mut members = JsonObject::open(&mut out);
    members.value("device_type", &ua.device_type);
    members.str("platform", &ua.platform);
    members.str("browser", &ua.browser);
    members.str("browser_version", &ua.browser_version);
    members.close();
    // Without the braces: the members go into the record's `client`.
    out[1..out.len() - 1].to_vec()
}

/// What runs for the profile; [`ProfileRuntime::shutdown`] stops it.
pub struct ProfileRuntime {
    facts: Arc<SystemFacts>,
    store: Option<StoreHandle>,
    shipper: Option<ShipperHandle>,
    tasks: Vec<JoinHandle<()>>,
    background: Background,
    /// What the store and the collector were started with: they are not
    /// restarted by a reload.
    started_with: (Option<StoreConfig>, Option<CollectorConfig>),
}

impl ProfileRuntime {
    /// Starts the sampler, and the store and shipper when configured. The
    /// store takes its directory's lock, so a second daemon on the same
    /// directory fails here with a clear message.
    pub fn start(config: &ProfileConfig, metrics: &ProfileMetrics) -> anyhow::Result<Self> {
        let background = Background::start()?;
        // Everything below spawns onto the profile's own thread.
        let _context = background.handle.enter();
        let host = HostSampler::start(config.metadata.host_sample_interval);
        let mut tasks = Vec::new();
        let store = match &config.store {
            Some(store) => {
                let (handle, task) = Store::open(StoreOptions {
                    dir: store.path.clone(),
                    max_file_bytes: store.max_file_bytes,
                    max_files: store.max_files,
                    queue_capacity: store.queue_capacity,
                    fsync_interval: store.fsync_interval,
                    metrics: metrics.clone(),
                })?;
                tasks.push(background.handle.spawn(task.run()));
                info!(path = %store.path.display(), "profile records stored");
                Some(handle)
            }
            None => None,
        };
        let shipper = match (&config.collector, &store) {
            (Some(collector), Some(store)) => {
                let (handle, task) = Shipper::start(store, shipper_options(collector))?;
                tasks.push(background.handle.spawn(task.run()));
                info!(url = %collector.url, "profile records shipped");
                Some(handle)
            }
            // Validation refuses a collector without a store.
            _ => None,
        };
        Ok(Self {
            facts: Arc::new(SystemFacts {
                host,
                host_json: Mutex::new(None),
                parsed: Mutex::new(HashMap::default()),
            }),
            store,
            shipper,
            tasks,
            background,
            started_with: (config.store.clone(), config.collector.clone()),
        })
    }

    pub fn facts(&self) -> Arc<dyn Facts> {
        self.facts.clone()
    }

    pub fn store(&self) -> Option<StoreHandle> {
        self.store.clone()
    }

    /// A reload changes modes, headers and what records hold at once; the
    /// store and the collector keep running as they were started.
    pub fn check_reload(&self, config: &ProfileConfig) {
        if (config.store.clone(), config.collector.clone()) != self.started_with {
            warn!("profile store or collector changed: applied at the next restart");
        }
    }

    /// After the proxy has drained: the shipper stops (a batch in flight
    /// finishes and its cursor is saved), then the store writes what is
    /// queued and fsyncs.
    pub async fn shutdown(self) {
        if let Some(shipper) = &self.shipper {
            shipper.shutdown().await;
        }
        if let Some(store) = &self.store {
            store.shutdown().await;
        }
        for task in self.tasks {
            let _ = task.await;
        }
        // The thread ends, and its runtime with it.
        drop(self.background);
    }
}

/// The profile's background work (the store's writer, the shipper, the
/// host sampler) runs on a thread and a runtime of its own, never on the
/// proxy's workers: a batch of records written or a 700 KB upload to the
/// collector never holds up a request waiting for its turn there.
/// Its threads are `SCHED_BATCH` (see [`background_policy`]).
struct Background {
    handle: tokio::runtime::Handle,
    /// Dropped (or sent), the thread's runtime stops.
    _stop: oneshot::Sender<()>,
}

impl Background {
    fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("sentinel-profile")
            .on_thread_start(background_policy)
            .build()
            .context("cannot start the profile's runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("sentinel-profile".into())
            .spawn(move || {
                background_policy();
                runtime.block_on(async {
                    let _ = stopped.await;
                })
            })
            .context("cannot start the profile's thread")?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

/// Puts the calling thread in the `SCHED_BATCH` class, whose wake-ups the
/// kernel does not let preempt a running thread. The profile's threads
/// wake a few hundred times a second (the writer's windows, the shipper's
/// batches); in the normal class each wake could take the CPU from a proxy
/// worker in the middle of a request, which under wrk showed as 20 times more
/// involuntary context switches of the worker in lite mode than in off.
/// The class keeps their fair share of CPU (no starvation, so the queue
/// does not fill), only not ahead of the request path.
fn background_policy() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the duration of the call,
    // and pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "cannot move a profile thread to SCHED_BATCH; it stays in the normal class"
        );
    }
}

fn shipper_options(collector: &CollectorConfig) -> ShipperOptions {
    let mut options = ShipperOptions::new(collector.url.clone());
    options.batch_size = collector.batch_size;
    options.flush_interval = collector.flush_interval;
    options.request_timeout = collector.timeout;
    options.backoff_min = collector.backoff_min;
    options.backoff_max = collector.backoff_max;
    options.headers = collector.headers.clone();
    options.tls = ShipperTls {
        ca_cert: collector.tls.ca_cert.clone(),
        client_cert: collector.tls.client_cert.clone(),
        client_key: collector.tls.client_key.clone(),
        insecure_skip_verify: collector.tls.insecure_skip_verify,
    };
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> i32 {
        // SAFETY: no arguments but the calling thread's pid 0.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn background_threads_run_in_the_batch_class() {
        let ours = policy();
        let background = Background::start().unwrap();
        // The runtime's own thread, and one of its blocking threads.
        let (tx, rx) = std::sync::mpsc::channel();
        let blocking = tx.clone();
        background.handle.spawn(async move {
            tx.send(policy()).unwrap();
            tokio::task::spawn_blocking(move || blocking.send(policy()).unwrap());
        });
        let wait = std::time::Duration::from_secs(10);
        assert_eq!(rx.recv_timeout(wait).unwrap(), libc::SCHED_BATCH);
        assert_eq!(rx.recv_timeout(wait).unwrap(), libc::SCHED_BATCH);
        // The thread that started it is untouched.
        assert_eq!(policy(), ours);
    }
}
