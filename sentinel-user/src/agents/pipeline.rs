//! One request's way through its route's agents.
//!
//! A route names filters (`filters "waf" "auth"`); each filter calls one
//! agent in one phase (`request`, `response` or `both`). For each event,
//! the filters whose agent subscribed to it are called in the route's
//! order:
//!
//! - the first `block`, `redirect` or `challenge` wins: later agents are
//!   not called and the client gets that answer;
//! - header mutations accumulate: each agent sees the headers as the
//!   agents before it left them; response-header mutations asked for in
//!   the request phase apply to the final response;
//! - a call that fails (not running, timeout, open breaker, broken
//!   protocol) takes the filter's `failure-mode`, else the agent's: `open`
//!   continues, `closed` answers 503.
//!
//! With `enforce` false (monitor mode) decisions and kernel pushes are
//! recorded as "would have" and never carried out.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use sentinel_agent_protocol::{
    AgentResponse, Audit, Decision, DecisionRecord, Event, HeaderOp, Headers, RequestCompleteEvent,
    RequestMetadata, ResponseHeadersEvent,
};
use tracing::{debug, info, warn};

use super::{
    Agent, AgentError, Agents, RequestHeadersView, challenge::Challenges, kernel_push,
    kernel_push::KernelBridge, metrics::AgentMetrics,
};
use crate::{
    config::{AgentEvent, Config, FailureMode, FilterPhase, WafConfig},
    proxy::ProxyBody,
};

/// A route's filter, resolved to its agent and effective settings.
pub struct Filter {
    pub name: String,
    pub agent: Arc<Agent>,
    pub phase: FilterPhase,
    /// The filter's `timeout-ms`, else the agent's.
    pub timeout: Duration,
    /// The filter's `failure-mode`, else the agent's.
    pub failure_mode: FailureMode,
}

impl Filter {
    /// Whether this filter sends `event` to its agent.
    pub fn wants(&self, event: AgentEvent) -> bool {
        if !self.agent.config.subscribes(event) {
            return false;
        }
        match event {
            AgentEvent::RequestHeaders | AgentEvent::RequestBody | AgentEvent::GuardrailInspect => {
                self.phase != FilterPhase::Response
            }
            AgentEvent::ResponseHeaders | AgentEvent::ResponseBody => {
                self.phase != FilterPhase::Request
            }
            AgentEvent::Log | AgentEvent::WebsocketFrame => true,
        }
    }
}

/// The filters of one route, in order.
pub struct RouteAgents {
    pub route: String,
    pub filters: Vec<Filter>,
    /// The route's `policies.failure-mode`: decompression errors.
    pub route_failure_mode: FailureMode,
}

impl RouteAgents {
    pub fn wants(&self, event: AgentEvent) -> bool {
        self.filters.iter().any(|f| f.wants(event))
    }
}

/// Builds every route's filters from `config`; routes without filters have
/// no entry.
pub fn route_agents(config: &Config, agents: &Agents) -> HashMap<String, Arc<RouteAgents>> {
    let mut out = HashMap::new();
    for route in &config.routes {
        let mut filters = Vec::new();
        for name in &route.filters {
            // Validation guarantees both names resolve.
            let Some(cfg) = config.filters.iter().find(|f| f.name == *name) else {
                continue;
            };
            let Some(agent) = agents.get(&cfg.agent) else {
                continue;
            };
            filters.push(Filter {
                name: cfg.name.clone(),
                agent: agent.clone(),
                phase: cfg.phase,
                timeout: cfg.timeout.unwrap_or(agent.config.timeout),
                failure_mode: cfg.failure_mode.unwrap_or(agent.config.failure_mode),
            });
        }
        if !filters.is_empty() {
            out.insert(
                route.name.clone(),
                Arc::new(RouteAgents {
                    route: route.name.clone(),
                    filters,
                    route_failure_mode: route.policies.failure_mode,
                }),
            );
        }
    }
    out
}

/// What every exchange shares: metrics, the kernel, challenges, the waf
/// block.
pub struct AgentContext {
    pub metrics: AgentMetrics,
    pub kernel: Option<Arc<dyn KernelBridge>>,
    pub challenges: Challenges,
    pub waf: WafConfig,
}

/// What to do next.
pub enum Step {
    Continue,
    /// Answer the client with this instead.
    Respond(Response<ProxyBody>),
}

/// One request's state across its agent phases. Shared by the handler and
/// the body tasks; the mutable part is behind a lock never held across an
/// agent call.
pub struct Exchange {
    pub agents: Arc<RouteAgents>,
    pub context: Arc<AgentContext>,
    pub metadata: RequestMetadata,
    pub client: IpAddr,
    /// `false` in monitor mode.
    pub enforce: bool,
    /// The request's path and query, for challenge pages.
    pub target: String,
    /// The client's `Cookie` headers, where a passed challenge is.
    cookies: HeaderMap,
    state: std::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Response-header mutations asked for before the response existed.
    response_ops: Vec<HeaderOp>,
    decisions: Vec<DecisionRecord>,
    audits: Vec<(String, Audit)>,
}

/// Headers as the protocol carries them: lowercase names, values in
/// order (non-UTF-8 bytes replaced).
pub fn to_protocol(headers: &HeaderMap) -> Headers {
    let mut out = Headers::new();
    for (name, value) in headers {
        out.entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    out
}

/// Headers an agent may not touch: they frame the message, and changing
/// them would let an agent smuggle requests or break connections.
fn protected(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-connection"
    )
}

/// Applies `ops` in the documented order: every `remove`, then every
/// `set`, then every `add`. Invalid or protected names and values are
/// skipped with a warning.
pub fn apply_ops(headers: &mut HeaderMap, ops: &[HeaderOp], agent: &str) {
    let parse = |name: &str| -> Option<HeaderName> {
        match header_name(name) {
            Ok(n) if protected(&n) => {
                warn!(agent, header = %n, "agent may not change this header; ignored");
                None
            }
            Ok(n) => Some(n),
            Err(_) => {
                warn!(agent, "agent named an invalid header; ignored");
                None
            }
        }
    };
    let value = |v: &str| -> Option<HeaderValue> {
        let parsed = HeaderValue::from_str(v).ok();
        if parsed.is_none() {
            warn!(agent, "agent gave an invalid header value; ignored");
        }
        parsed
    };
    for op in ops {
        if let HeaderOp::Remove { name } = op
            && let Some(n) = parse(name)
        {
            headers.remove(n);
        }
    }
    for op in ops {
        if let HeaderOp::Set { name, value: v } = op
            && let (Some(n), Some(v)) = (parse(name), value(v))
        {
            headers.insert(n, v);
        }
    }
    for op in ops {
        if let HeaderOp::Add { name, value: v } = op
            && let (Some(n), Some(v)) = (parse(name), value(v))
        {
            headers.append(n, v);
        }
    }
}

/// `name` as a header name. Agents name the same few headers call after
/// call, most in mixed case (which `HeaderName::from_bytes` lowercases into
/// a new allocation): the names a thread parsed last are kept, by the text
/// the agent sent.
fn header_name(name: &str) -> Result<HeaderName, http::header::InvalidHeaderName> {
    const KEPT: usize = 16;
    thread_local! {
        static RECENT: std::cell::RefCell<Vec<(Box<str>, HeaderName)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    RECENT.with_borrow_mut(|recent| {
        if let Some((_, parsed)) = recent.iter().find(|(text, _)| **text == *name) {
            return Ok(parsed.clone());
        }
        let parsed = HeaderName::from_bytes(name.as_bytes())?;
        if recent.len() == KEPT {
            recent.remove(0);
        }
        recent.push((name.into(), parsed.clone()));
        Ok(parsed)
    })
}

fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// 503 for a failed call under `failure-mode "closed"`.
pub fn unavailable() -> Response<ProxyBody> {
    let mut r = Response::new(full(
        "service unavailable: a security check could not be completed\n",
    ));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

thread_local! {
    /// Metadata of finished exchanges, whose strings the next ones on this
    /// thread are written into.
    static SPARE_METADATA: std::cell::RefCell<Vec<RequestMetadata>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// How many spare metadata a thread keeps.
const SPARE_METADATA_KEPT: usize = 64;

/// A metadata to fill for a new exchange: a finished one's, when this
/// thread has one.
pub fn spare_metadata() -> RequestMetadata {
    SPARE_METADATA.with_borrow_mut(Vec::pop).unwrap_or_default()
}

/// Keeps `metadata`'s strings for a later exchange on this thread.
fn give_back_metadata(metadata: RequestMetadata) {
    SPARE_METADATA.with_borrow_mut(|spare| {
        if spare.len() < SPARE_METADATA_KEPT {
            spare.push(metadata);
        }
    });
}

impl Drop for Exchange {
    fn drop(&mut self) {
        give_back_metadata(std::mem::take(&mut self.metadata));
    }
}

impl Exchange {
    pub fn new(
        agents: Arc<RouteAgents>,
        context: Arc<AgentContext>,
        metadata: RequestMetadata,
        client: IpAddr,
        enforce: bool,
        target: String,
        request: &HeaderMap,
    ) -> Self {
        let mut cookies = HeaderMap::new();
        for value in request.get_all(header::COOKIE) {
            cookies.append(header::COOKIE, value.clone());
        }
        Self {
            agents,
            context,
            metadata,
            client,
            enforce,
            target,
            cookies,
            state: std::sync::Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decisions so far, for the access log and `request_complete`.
    pub fn decisions(&self) -> Vec<DecisionRecord> {
        self.state().decisions.clone()
    }

    /// Answers for a `block` or `redirect`.
    fn decision_response(&self, decision: &Decision) -> Response<ProxyBody> {
        match decision {
            Decision::Block {
                status,
                body,
                headers,
            } => {
                let text = body.clone().unwrap_or_else(|| "blocked\n".to_owned());
                let mut r = Response::new(full(text));
                *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                let ops: Vec<HeaderOp> = headers
                    .iter()
                    .map(|(name, value)| HeaderOp::Set {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect();
                apply_ops(r.headers_mut(), &ops, "block");
                r
            }
            Decision::Redirect { url, status } => {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND);
                match HeaderValue::from_str(url) {
                    Ok(v) => {
                        r.headers_mut().insert(header::LOCATION, v);
                    }
                    Err(_) => {
                        warn!("agent redirect URL is not a valid header value; answering 502");
                        *r.status_mut() = StatusCode::BAD_GATEWAY;
                    }
                }
                r
            }
            Decision::Challenge {
                challenge_type,
                params,
            } => self
                .context
                .challenges
                .page(self.client, &self.target, challenge_type, params),
            Decision::Allow => Response::new(full(Bytes::new())),
        }
    }

    fn record(&self, agent: &str, decision: &Decision, enforced: bool) {
        self.context
            .metrics
            .decisions
            .with_label_values(&[
                self.agents.route.as_str(),
                decision.name(),
                if enforced { "true" } else { "false" },
            ])
            .inc();
        self.state().decisions.push(DecisionRecord {
            agent: agent.to_owned(),
            decision: decision.name().to_owned(),
            enforced,
        });
    }

    /// What an answer asks beyond headers: a kernel push, an audit, a
    /// decision. `Some` when the request ends here.
    pub async fn settle(
        &self,
        filter: &Filter,
        answer: &AgentResponse,
    ) -> Option<Response<ProxyBody>> {
        let agent = filter.agent.name();
        if let Some(push) = &answer.kernel_push {
            kernel_push::apply(
                self.context.kernel.clone(),
                &self.context.metrics,
                agent,
                filter.agent.config.kernel_push.as_ref(),
                push,
                self.client,
                self.enforce,
            )
            .await;
        }
        if let Some(audit) = &answer.audit
            && !audit.is_empty()
        {
            self.state().audits.push((agent.to_owned(), audit.clone()));
        }
        match &answer.decision {
            Decision::Allow => None,
            Decision::Challenge { .. }
                if self.context.challenges.passed(&self.cookies, self.client) =>
            {
                debug!(agent, "challenge already passed");
                self.state().decisions.push(DecisionRecord {
                    agent: agent.to_owned(),
                    decision: "challenge_passed".to_owned(),
                    enforced: false,
                });
                None
            }
            decision => {
                self.record(agent, decision, self.enforce);
                if self.enforce {
                    info!(
                        agent,
                        route = %self.agents.route,
                        decision = decision.name(),
                        client = %self.client,
                        "request stopped by an agent"
                    );
                    Some(self.decision_response(decision))
                } else {
                    info!(
                        agent,
                        route = %self.agents.route,
                        decision = decision.name(),
                        client = %self.client,
                        "monitor: an agent would have stopped this request"
                    );
                    None
                }
            }
        }
    }

    /// A failed call: `Some(503)` when the filter fails closed (and
    /// decisions are enforced).
    pub fn failed(&self, filter: &Filter, error: &AgentError) -> Option<Response<ProxyBody>> {
        let agent = filter.agent.name();
        match filter.failure_mode {
            FailureMode::Open => {
                debug!(agent, error = %error, "agent call failed; failing open");
                None
            }
            FailureMode::Closed => {
                warn!(agent, error = %error, route = %self.agents.route, "agent call failed; failing closed");
                let decision = Decision::block(503);
                self.record(agent, &decision, self.enforce);
                self.enforce.then(unavailable)
            }
        }
    }

    /// The `request_headers` event, through every subscribed filter.
    pub async fn request_headers(&self, method: &str, uri: &str, headers: &mut HeaderMap) -> Step {
        let agents = self.agents.clone();
        for filter in agents
            .filters
            .iter()
            .filter(|f| f.wants(AgentEvent::RequestHeaders))
        {
            let view = RequestHeadersView {
                metadata: &self.metadata,
                method,
                uri,
                headers: &*headers,
            };
            match filter
                .agent
                .call_request_headers(view, filter.timeout)
                .await
            {
                Ok(answer) => {
                    apply_ops(headers, &answer.request_headers, filter.agent.name());
                    if !answer.response_headers.is_empty() {
                        self.state()
                            .response_ops
                            .extend(answer.response_headers.iter().cloned());
                    }
                    if let Some(stop) = self.settle(filter, &answer).await {
                        return Step::Respond(stop);
                    }
                }
                Err(e) => {
                    if let Some(stop) = self.failed(filter, &e) {
                        return Step::Respond(stop);
                    }
                }
            }
        }
        Step::Continue
    }

    /// The `response_headers` event. Mutations apply to `headers`.
    pub async fn response_headers(&self, status: StatusCode, headers: &mut HeaderMap) -> Step {
        let agents = self.agents.clone();
        for filter in agents
            .filters
            .iter()
            .filter(|f| f.wants(AgentEvent::ResponseHeaders))
        {
            let event = Event::ResponseHeaders(ResponseHeadersEvent {
                correlation_id: self.metadata.correlation_id.clone(),
                status: status.as_u16(),
                headers: to_protocol(headers),
            });
            match filter.agent.call(event, filter.timeout).await {
                Ok(answer) => {
                    apply_ops(headers, &answer.response_headers, filter.agent.name());
                    if let Some(stop) = self.settle(filter, &answer).await {
                        return Step::Respond(stop);
                    }
                }
                Err(e) => {
                    if let Some(stop) = self.failed(filter, &e) {
                        return Step::Respond(stop);
                    }
                }
            }
        }
        Step::Continue
    }

    /// Applies the response-header mutations gathered in the request
    /// phase to the response the client gets.
    pub fn finish_headers(&self, headers: &mut HeaderMap) {
        let ops = std::mem::take(&mut self.state().response_ops);
        if !ops.is_empty() {
            apply_ops(headers, &ops, "agents");
        }
    }

    /// What the `log` subscribers need once the response is done.
    pub fn completion(&self) -> Option<Completion> {
        let filters: Vec<(Arc<Agent>, Duration)> = self
            .agents
            .filters
            .iter()
            .filter(|f| f.wants(AgentEvent::Log))
            .map(|f| (f.agent.clone(), f.timeout))
            .collect();
        (!filters.is_empty()).then(|| Completion {
            filters,
            metadata: self.metadata.clone(),
            decisions: self.decisions(),
        })
    }
}

/// Sends `request_complete` to the `log` subscribers, off the request's
/// path: the client never waits for it.
pub struct Completion {
    filters: Vec<(Arc<Agent>, Duration)>,
    metadata: RequestMetadata,
    decisions: Vec<DecisionRecord>,
}

/// How a request ended, for `request_complete`.
pub struct Outcome {
    pub status: u16,
    pub duration: Duration,
    pub request_body_size: u64,
    pub response_body_size: u64,
    pub upstream_attempts: u32,
    pub error: Option<String>,
    pub record: Option<serde_json::Value>,
}

impl Completion {
    pub fn send(self, outcome: Outcome) {
        let event = RequestCompleteEvent {
            correlation_id: self.metadata.correlation_id.clone(),
            status: outcome.status,
            duration_ms: outcome.duration.as_millis() as u64,
            request_body_size: outcome.request_body_size,
            response_body_size: outcome.response_body_size,
            upstream_attempts: outcome.upstream_attempts,
            error: outcome.error,
            metadata: Some(self.metadata),
            decisions: self.decisions,
            record: outcome.record,
        };
        for (agent, timeout) in self.filters {
            let event = Event::RequestComplete(event.clone());
            tokio::spawn(async move {
                if let Err(e) = agent.call(event, timeout).await {
                    debug!(agent = agent.name(), error = %e, "request_complete not delivered");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_run_remove_set_add_and_spare_framing_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("content-length", HeaderValue::from_static("5"));
        let ops = vec![
            HeaderOp::Add {
                name: "x-a".into(),
                value: "3".into(),
            },
            HeaderOp::Set {
                name: "x-a".into(),
                value: "2".into(),
            },
            HeaderOp::Remove { name: "x-a".into() },
            HeaderOp::Set {
                name: "Content-Length".into(),
                value: "999".into(),
            },
            HeaderOp::Remove {
                name: "transfer-encoding".into(),
            },
            HeaderOp::Set {
                name: "bad name".into(),
                value: "x".into(),
            },
            HeaderOp::Set {
                name: "x-b".into(),
                value: "bad\nvalue".into(),
            },
        ];
        apply_ops(&mut h, &ops, "test");
        let values: Vec<_> = h.get_all("x-a").iter().collect();
        assert_eq!(values, ["2", "3"]);
        assert_eq!(h["content-length"], "5");
        assert!(h.get("x-b").is_none());
    }

    #[test]
    fn protocol_headers_keep_every_value() {
        let mut h = HeaderMap::new();
        h.append("accept", HeaderValue::from_static("a"));
        h.append("accept", HeaderValue::from_static("b"));
        let p = to_protocol(&h);
        assert_eq!(p["accept"], ["a", "b"]);
    }
}
