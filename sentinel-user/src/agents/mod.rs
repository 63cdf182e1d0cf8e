//! External agents: their transports (`uds`, `remote`), circuit breakers
//! (`breaker`), the per-request dispatch of lifecycle events through a
//! route's filters (`pipeline`), kernel pushes (`kernel_push`) and
//! challenges (`challenge`).
//!
//! An [`Agent`] is built from its configuration and kept across reloads
//! while that configuration does not change, so its connections, breaker
//! state and counters carry over.

pub mod body;
pub mod breaker;
pub mod challenge;
pub mod kernel_push;
pub mod metrics;
mod outgoing;
pub mod pipeline;
mod remote;
mod uds;
pub mod websocket;

use std::{collections::HashMap, sync::Arc, time::Duration};

use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, ConfigureEvent, Event, KernelPushLimits, ProtocolError,
    frame::FrameError,
};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::{AgentConfig, AgentEvent, AgentTransport, AgentType, Config};
use metrics::{AgentCounters, AgentMetrics};
use outgoing::Outgoing;
pub use outgoing::RequestHeadersView;

/// Why an agent call did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent: {reason}")]
    Connect { reason: String },
    #[error("no answer within {after_ms} ms")]
    Timeout { after_ms: u128 },
    #[error("circuit breaker is open")]
    CircuitOpen,
    #[error("{reason}")]
    Closed { reason: String },
    #[error("the agent broke the protocol: {reason}")]
    Protocol { reason: String },
    #[error("the agent speaks protocol version {got}, not 1")]
    Version { got: u32 },
    #[error("a message of {len} bytes is over the 10 MiB limit")]
    TooLarge { len: usize },
    #[error("the agent refused its configuration (answered {decision})")]
    Refused { decision: &'static str },
    #[error("{reason}")]
    Transport { reason: String },
}

impl AgentError {
    /// The `error` label of `sentinel_agent_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::Connect { .. } => "connect",
            AgentError::Timeout { .. } => "timeout",
            AgentError::CircuitOpen => "circuit_open",
            AgentError::Closed { .. } => "closed",
            AgentError::Protocol { .. } => "protocol",
            AgentError::Version { .. } => "version",
            AgentError::TooLarge { .. } => "too_large",
            AgentError::Refused { .. } => "refused",
            AgentError::Transport { .. } => "transport",
        }
    }
}

impl From<ProtocolError> for AgentError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Version { got } => AgentError::Version { got },
            other => AgentError::Protocol {
                reason: other.to_string(),
            },
        }
    }
}

impl From<FrameError> for AgentError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { len, .. } => AgentError::TooLarge { len },
            FrameError::Truncated => AgentError::Closed {
                reason: "the agent closed the connection in the middle of a frame".to_owned(),
            },
            FrameError::Io(io) => AgentError::Closed {
                reason: format!("agent connection: {io}"),
            },
        }
    }
}

enum Transport {
    Uds(Box<uds::UdsClient>),
    Grpc(Box<remote::GrpcClient>),
    Http(Box<remote::HttpClient>),
}

/// One configured agent.
pub struct Agent {
    pub config: AgentConfig,
    transport: Transport,
    breaker: Arc<breaker::Breaker>,
    /// `max-concurrent-calls`.
    slots: Semaphore,
    counters: AgentCounters,
}

impl Agent {
    pub fn new(config: &AgentConfig, metrics: &AgentMetrics) -> Result<Arc<Self>, AgentError> {
        let configure = ConfigureEvent {
            agent_id: config.name.clone(),
            config: config.config.clone(),
            extensions: if config.kernel_push.is_some() {
                vec![sentinel_agent_protocol::extensions::KERNEL_PUSH.to_owned()]
            } else {
                Vec::new()
            },
            kernel_push: config.kernel_push.as_ref().map(|k| KernelPushLimits {
                max_ttl_seconds: k.max_ttl.as_secs(),
                min_prefix_len_v4: k.min_prefix_len_v4,
                min_prefix_len_v6: k.min_prefix_len_v6,
            }),
        };
        let transport = match &config.transport {
            AgentTransport::UnixSocket(path) => Transport::Uds(Box::new(uds::UdsClient::new(
                &config.name,
                path.clone(),
                configure,
            ))),
            AgentTransport::Grpc { url, tls } => Transport::Grpc(Box::new(
                remote::GrpcClient::new(url, tls, config.timeout, configure)?,
            )),
            AgentTransport::Http { url, tls } => Transport::Http(Box::new(
                remote::HttpClient::new(url, tls, config.timeout, configure)?,
            )),
        };
        let counters = AgentCounters::new(metrics, &config.name);
        let breaker =
            breaker::Breaker::new(config.circuit_breaker.clone(), counters.breaker_gauge());
        if config.agent_type == AgentType::Waf && config.subscribes(AgentEvent::RequestBody) {
            debug!(agent = %config.name, "waf agent: request bodies follow waf.body-inspection");
        }
        Ok(Arc::new(Self {
            config: config.clone(),
            transport,
            breaker,
            slots: Semaphore::new(config.max_concurrent_calls),
            counters,
        }))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn breaker_state(&self) -> breaker::State {
        self.breaker.state()
    }

    /// Sends one event and waits for the answer, within `timeout`, through
    /// the breaker and the concurrency cap, counting the outcome.
    pub async fn call(&self, event: Event, timeout: Duration) -> Result<AgentResponse, AgentError> {
        self.send(Outgoing::Request(AgentRequest::new(event)), timeout)
            .await
    }

    /// [`Agent::call`] for `request_headers`, written straight from the
    /// request head where the transport allows it.
    pub async fn call_request_headers(
        &self,
        view: RequestHeadersView<'_>,
        timeout: Duration,
    ) -> Result<AgentResponse, AgentError> {
        self.send(Outgoing::RequestHeaders(view), timeout).await
    }

    async fn send(
        &self,
        outgoing: Outgoing<'_>,
        timeout: Duration,
    ) -> Result<AgentResponse, AgentError> {
        let kind = outgoing.event_type();
        let c = &self.counters;
        let Some(pass) = self.breaker.try_pass() else {
            c.statuses[3].inc();
            c.error("circuit_open");
            return Err(AgentError::CircuitOpen);
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(timeout, async {
            // A free slot is the rule; waiting for one, the exception.
            let _slot = match self.slots.try_acquire() {
                Ok(slot) => slot,
                Err(_) => self.slots.acquire().await.map_err(|_| AgentError::Closed {
                    reason: "the agent is shutting down".to_owned(),
                })?,
            };
            match &self.transport {
                Transport::Uds(t) => t.send(outgoing).await,
                Transport::Grpc(t) => t.send(outgoing.into_request()).await,
                Transport::Http(t) => t.send(outgoing.into_request()).await,
            }
        })
        .await
        .unwrap_or(Err(AgentError::Timeout {
            after_ms: timeout.as_millis(),
        }));
        c.duration[kind as usize].observe(started.elapsed().as_secs_f64());
        self.breaker.done(pass, result.is_ok());
        match &result {
            Ok(_) => c.statuses[0].inc(),
            Err(AgentError::Timeout { .. }) => {
                c.statuses[2].inc();
                c.timeouts.inc();
                c.error("timeout");
            }
            Err(e) => {
                c.statuses[1].inc();
                c.error(e.kind());
            }
        }
        result
    }
}

/// Every configured agent, by name.
#[derive(Default)]
pub struct Agents {
    by_name: HashMap<String, Arc<Agent>>,
}

impl Agents {
    /// Builds the agents of `config`, reusing those of `previous` whose
    /// configuration did not change.
    pub fn build(
        config: &Config,
        previous: Option<&Agents>,
        metrics: &AgentMetrics,
    ) -> Result<Self, AgentError> {
        let mut by_name = HashMap::new();
        for cfg in &config.agents {
            let reused = previous
                .and_then(|p| p.by_name.get(&cfg.name))
                .filter(|a| a.config == *cfg)
                .cloned();
            let agent = match reused {
                Some(a) => a,
                None => {
                    info!(agent = %cfg.name, transport = transport_name(&cfg.transport), "agent configured");
                    Agent::new(cfg, metrics)?
                }
            };
            if cfg.agent_type == AgentType::Waf
                && cfg.subscribes(AgentEvent::RequestBody)
                && !config.waf.body_inspection.inspect_request_body
            {
                warn!(
                    agent = %cfg.name,
                    "waf agent subscribes to request_body but waf.body-inspection.inspect-request-body is #false: it will not be sent request bodies"
                );
            }
            by_name.insert(cfg.name.clone(), agent);
        }
        Ok(Self { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Agent>> {
        self.by_name.get(name)
    }
}

fn transport_name(t: &AgentTransport) -> &'static str {
    match t {
        AgentTransport::UnixSocket(_) => "unix-socket",
        AgentTransport::Grpc { .. } => "grpc",
        AgentTransport::Http { .. } => "http",
    }
}
