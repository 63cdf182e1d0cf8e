//! The profile's background machinery as the daemon runs it: the host
//! sampler, the local store's writer and the collector's shipper, started
//! from `profile { ... }` and stopped in order on shutdown.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{
    client,
    host::{HostInfo, HostSampler},
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
/// the address, host facts from the latest sample.
struct SystemFacts {
    host: HostInfo,
    /// User-Agent (absent: `None`) to its fields; emptied when full.
    parsed: Mutex<HashMap<Option<String>, Map<String, Value>>>,
}

impl Facts for SystemFacts {
    fn client(&self, ip: IpAddr, user_agent: Option<&str>) -> Map<String, Value> {
        let key = user_agent.map(str::to_owned);
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        let mut fields = match parsed.get(&key) {
            Some(fields) => fields.clone(),
            None => {
                let ua = client::parse_user_agent(user_agent.unwrap_or_default());
                let mut fields = Map::new();
                fields.insert("device_type".into(), json!(ua.device_type));
                fields.insert("platform".into(), json!(ua.platform));
                fields.insert("browser".into(), json!(ua.browser));
                fields.insert("browser_version".into(), json!(ua.browser_version));
                if parsed.len() >= USER_AGENT_CACHE {
                    parsed.clear();
                }
                parsed.insert(key, fields.clone());
                fields
            }
        };
        drop(parsed);
        fields.insert("network_type".into(), json!(client::network_type(ip)));
        fields
    }

    fn host(&self) -> Value {
        serde_json::to_value(&*self.host.snapshot()).unwrap_or(Value::Null)
    }
}

/// What runs for the profile; [`ProfileRuntime::shutdown`] stops it.
pub struct ProfileRuntime {
    facts: Arc<SystemFacts>,
    store: Option<StoreHandle>,
    shipper: Option<ShipperHandle>,
    tasks: Vec<JoinHandle<()>>,
    /// What the store and the collector were started with: they are not
    /// restarted by a reload.
    started_with: (Option<StoreConfig>, Option<CollectorConfig>),
}

impl ProfileRuntime {
    /// Starts the sampler, and the store and shipper when configured. The
    /// store takes its directory's lock, so a second daemon on the same
    /// directory fails here with a clear message.
    pub fn start(config: &ProfileConfig, metrics: &ProfileMetrics) -> anyhow::Result<Self> {
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
                tasks.push(tokio::spawn(task.run()));
                info!(path = %store.path.display(), "profile records stored");
                Some(handle)
            }
            None => None,
        };
        let shipper = match (&config.collector, &store) {
            (Some(collector), Some(store)) => {
                let (handle, task) = Shipper::start(store, shipper_options(collector))?;
                tasks.push(tokio::spawn(task.run()));
                info!(url = %collector.url, "profile records shipped");
                Some(handle)
            }
            // Validation refuses a collector without a store.
            _ => None,
        };
        Ok(Self {
            facts: Arc::new(SystemFacts {
                host,
                parsed: Mutex::new(HashMap::new()),
            }),
            store,
            shipper,
            tasks,
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
