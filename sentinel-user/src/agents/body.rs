//! Request and response bodies through the agents that subscribed to them.
//!
//! Each subscribed filter is a stage; a body's bytes flow through the
//! stages in the route's order, each passing on what its agent approved
//! (and possibly rewrote), so the upstream (or the client) only ever sees
//! inspected bytes:
//!
//! - `buffer`: the whole body, up to the agent's limit, as one chunk with
//!   `is_last`; a longer body is inspected up to the limit (`truncated`)
//!   and the rest passes;
//! - `stream`: every chunk as it arrives, with `chunk-timeout-ms`;
//! - `hybrid:N`: buffered up to N bytes; a longer body is then streamed;
//! - a `waf` agent under `waf { body-inspection { ... } }`: buffered up to
//!   `max-body-inspection-bytes`, for the eligible content types only,
//!   decompressed first when `decompress` is on, with the seed's
//!   fail-open / fail-closed table for decompression errors;
//! - `guardrail_inspect`: the body's text, buffered, once per
//!   `guardrail-types` entry.
//!
//! The stages run in a task that feeds the forwarded body through a small
//! channel (backpressure is kept). A decision that stops the request is
//! left in [`Stopped`] and the forwarded body fails, which aborts the
//! upstream request; the handler answers with the decision.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use sentinel_agent_protocol::{BodyChunkEvent, Event, GuardrailInspectEvent};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::pipeline::{Exchange, Filter};
use crate::{
    config::{AgentEvent, AgentType, BodyMode, FailureMode},
    inspect::{
        self,
        decompress::{self, Encoding},
    },
    proxy::{BoxError, ProxyBody},
};

/// Bytes of body a buffered event carries at most: base64 makes 4 bytes of
/// 3, and the whole message must stay under the protocol's 10 MiB.
pub const MAX_EVENT_BODY: u64 = 7 * 1024 * 1024;

/// An agent's body limit when it sets none.
pub const DEFAULT_AGENT_BODY: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// A decision taken while the body flowed: the handler's answer.
#[derive(Default)]
pub struct Stopped {
    response: Mutex<Option<Response<ProxyBody>>>,
    /// When every stage buffers and one replaced the body: its new length.
    pub new_length: Mutex<Option<u64>>,
}

impl Stopped {
    pub fn take(&self) -> Option<Response<ProxyBody>> {
        self.response
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn set(&self, response: Response<ProxyBody>) {
        *self.response.lock().unwrap_or_else(|p| p.into_inner()) = Some(response);
    }

    pub fn new_length(&self) -> Option<u64> {
        *self.new_length.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The error a body fails with when an agent stopped the request.
#[derive(Debug, thiserror::Error)]
#[error("an agent stopped the request")]
pub struct AgentStop;

/// Whether `error`'s chain holds an [`AgentStop`].
pub fn is_agent_stop(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<AgentStop>() {
            return true;
        }
        current = e.source();
    }
    false
}

enum Kind {
    /// A plain `request_body` / `response_body` subscription.
    Agent { mode: BodyMode, limit: u64 },
    /// A waf agent under `waf { body-inspection }`.
    Waf {
        limit: u64,
        decompress: Option<Result<Encoding, String>>,
        on_error: FailureMode,
    },
    Guardrail {
        limit: u64,
        types: Vec<String>,
        content_type: Option<String>,
    },
}

struct Stage<'a> {
    filter: &'a Filter,
    kind: Kind,
    /// Bytes held by a buffering stage.
    held: BytesMut,
    streaming: bool,
    /// Inspected bytes so far (the limit counts them).
    seen: u64,
    chunk_index: u32,
    /// The agent is no longer called: its limit passed, or it failed open.
    passthrough: bool,
    /// This stage announced `is_last` already.
    finished: bool,
}

/// The plan of one body: which filters inspect it, how.
pub struct Plan {
    stages: Vec<(usize, Kind)>,
}

impl Plan {
    /// The stages of `direction` for a body with these headers; `None`
    /// when no filter inspects it.
    pub fn new(exchange: &Exchange, direction: Direction, headers: &HeaderMap) -> Option<Self> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let encoding = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let waf = &exchange.context.waf.body_inspection;
        let event = match direction {
            Direction::Request => AgentEvent::RequestBody,
            Direction::Response => AgentEvent::ResponseBody,
        };
        let mut stages = Vec::new();
        for (i, filter) in exchange.agents.filters.iter().enumerate() {
            let cfg = &filter.agent.config;
            let own_limit = match direction {
                Direction::Request => cfg.max_request_body_bytes,
                Direction::Response => cfg.max_response_body_bytes,
            };
            if filter.wants(event) {
                if cfg.agent_type == AgentType::Waf {
                    let on = match direction {
                        Direction::Request => waf.inspect_request_body,
                        Direction::Response => waf.inspect_response_body,
                    };
                    if on && inspect::eligible(content_type.as_deref(), &waf.content_types) {
                        let limit = own_limit
                            .map_or(waf.max_body_inspection_bytes, |l| {
                                l.min(waf.max_body_inspection_bytes)
                            })
                            .min(MAX_EVENT_BODY);
                        let decompress = match (&encoding, waf.decompress) {
                            (Some(e), true) => Encoding::parse(e).transpose(),
                            _ => None,
                        };
                        stages.push((
                            i,
                            Kind::Waf {
                                limit,
                                decompress,
                                on_error: exchange.agents.route_failure_mode,
                            },
                        ));
                    }
                } else {
                    let mode = match direction {
                        Direction::Request => cfg.request_body_mode,
                        Direction::Response => cfg.response_body_mode,
                    };
                    let limit = own_limit.unwrap_or(DEFAULT_AGENT_BODY);
                    let limit = match mode {
                        BodyMode::Stream => limit,
                        _ => limit.min(MAX_EVENT_BODY),
                    };
                    stages.push((i, Kind::Agent { mode, limit }));
                }
            }
            if direction == Direction::Request
                && filter.wants(AgentEvent::GuardrailInspect)
                && inspect::textual(content_type.as_deref())
            {
                let limit = own_limit
                    .unwrap_or(waf.max_body_inspection_bytes)
                    .min(MAX_EVENT_BODY);
                stages.push((
                    i,
                    Kind::Guardrail {
                        limit,
                        types: cfg.guardrail_types.clone(),
                        content_type: content_type.clone(),
                    },
                ));
            }
        }
        (!stages.is_empty()).then_some(Self { stages })
    }

    /// Whether a stage may send bytes on before the body has ended (then
    /// the forwarded length is not known in advance).
    pub fn streams(&self) -> bool {
        self.stages.iter().any(|(_, k)| {
            matches!(
                k,
                Kind::Agent {
                    mode: BodyMode::Stream | BodyMode::Hybrid(_),
                    ..
                }
            )
        })
    }
}

/// The forwarded body: what the stages let through.
pub struct Inspected {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    done: bool,
}

impl Body for Inspected {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Starts the stages on `body`. The returned body yields what they let
/// through; `stopped` holds the answer if one of them stopped the request.
pub fn run(
    exchange: Arc<Exchange>,
    plan: Plan,
    direction: Direction,
    body: ProxyBody,
    total_size: Option<u64>,
) -> (ProxyBody, Arc<Stopped>) {
    let (tx, rx) = mpsc::channel(4);
    let stopped = Arc::new(Stopped::default());
    let stop = stopped.clone();
    tokio::spawn(async move {
        let ex = exchange;
        let agents = ex.agents.clone();
        let streams = plan.streams();
        let mut stages: Vec<Stage<'_>> = plan
            .stages
            .into_iter()
            .map(|(i, kind)| Stage {
                filter: &agents.filters[i],
                kind,
                held: BytesMut::new(),
                streaming: false,
                seen: 0,
                chunk_index: 0,
                passthrough: false,
                finished: false,
            })
            .collect();
        let mut runner = Runner {
            ex: &ex,
            direction,
            total_size,
            tx: &tx,
            stop: &stop,
            out_len: 0,
            replaced: false,
            streams,
        };
        let mut body = body;
        loop {
            let frame = body.frame().await;
            match frame {
                None => {
                    if runner.push(&mut stages, Bytes::new(), true).await.is_err() {
                        return;
                    }
                    break;
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let last = body.is_end_stream();
                        if runner.push(&mut stages, data, last).await.is_err() {
                            return;
                        }
                        if last {
                            break;
                        }
                    }
                    Err(trailers) => {
                        // Trailers end the body: finish the stages first.
                        if runner.push(&mut stages, Bytes::new(), true).await.is_err() {
                            return;
                        }
                        let _ = tx.send(Ok(trailers)).await;
                        break;
                    }
                },
            }
        }
    });
    (Inspected { rx, done: false }.boxed(), stopped)
}

struct Runner<'e, 't> {
    ex: &'e Exchange,
    direction: Direction,
    total_size: Option<u64>,
    tx: &'t mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    stop: &'t Stopped,
    out_len: u64,
    /// A buffering stage replaced the body.
    replaced: bool,
    /// Some stage streams: the body goes without a length.
    streams: bool,
}

/// The request ends here (or the client went away).
struct Halt;

impl Runner<'_, '_> {
    /// Passes `data` (the body's end when `last`) through every stage,
    /// then on.
    async fn push(
        &mut self,
        stages: &mut [Stage<'_>],
        data: Bytes,
        last: bool,
    ) -> Result<(), Halt> {
        let mut chunks = vec![data];
        for stage in stages.iter_mut() {
            let mut next = Vec::new();
            let count = chunks.len();
            for (n, chunk) in chunks.into_iter().enumerate() {
                let is_last = last && n + 1 == count;
                next.extend(self.stage(stage, chunk, is_last).await?);
            }
            if last && count == 0 {
                next.extend(self.stage(stage, Bytes::new(), true).await?);
            }
            chunks = next;
        }
        if last && self.replaced && !self.streams {
            // The new length must be known before the first byte of the
            // new body is: the head is sent as soon as that byte arrives
            // (`first_frame`), with the length read from here. Set after
            // the send, a head could go out with the old length, and the
            // client would wait for bytes that never come.
            let len = self.out_len + chunks.iter().map(|c| c.len() as u64).sum::<u64>();
            *self
                .stop
                .new_length
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(len);
        }
        for chunk in chunks {
            if chunk.is_empty() {
                continue;
            }
            self.out_len += chunk.len() as u64;
            if self.tx.send(Ok(Frame::data(chunk))).await.is_err() {
                // The upstream request (or the client) is gone.
                return Err(Halt);
            }
        }
        Ok(())
    }

    fn halt(&self, response: Response<ProxyBody>) -> Halt {
        self.stop.set(response);
        let _ = self.tx.try_send(Err(Box::new(AgentStop)));
        Halt
    }

    async fn stage(
        &mut self,
        s: &mut Stage<'_>,
        chunk: Bytes,
        last: bool,
    ) -> Result<Vec<Bytes>, Halt> {
        if s.passthrough || s.finished {
            return Ok(vec![chunk]);
        }
        match &s.kind {
            Kind::Agent { mode, limit } => {
                let (mode, limit) = (*mode, *limit);
                let threshold = match mode {
                    BodyMode::Buffer => limit,
                    BodyMode::Hybrid(n) => n.min(limit),
                    BodyMode::Stream => 0,
                };
                if mode == BodyMode::Stream || s.streaming {
                    return self.stream(s, chunk, last, limit).await;
                }
                s.held.extend_from_slice(&chunk);
                if last {
                    let held = s.held.split().freeze();
                    return self.buffered(s, held, false).await;
                }
                if s.held.len() as u64 >= threshold {
                    let held = s.held.split().freeze();
                    if let BodyMode::Hybrid(_) = mode {
                        // Past the hybrid threshold: stream from here on.
                        s.streaming = true;
                        return self.stream(s, held, false, limit).await;
                    }
                    // Past the buffer limit: the agent sees the first
                    // `limit` bytes; the rest passes uninspected.
                    let cut = held.slice(..(limit as usize).min(held.len()));
                    self.buffered(s, cut, true).await?;
                    s.passthrough = true;
                    return Ok(vec![held]);
                }
                Ok(Vec::new())
            }
            Kind::Waf { limit, .. } | Kind::Guardrail { limit, .. } => {
                let limit = *limit;
                s.held.extend_from_slice(&chunk);
                if last {
                    let held = s.held.split().freeze();
                    return self.buffered(s, held, false).await;
                }
                if s.held.len() as u64 >= limit {
                    let held = s.held.split().freeze();
                    let cut = held.slice(..(limit as usize).min(held.len()));
                    self.buffered(s, cut, true).await?;
                    s.passthrough = true;
                    return Ok(vec![held]);
                }
                Ok(Vec::new())
            }
        }
    }

    fn chunk_event(
        &self,
        s: &Stage<'_>,
        data: Vec<u8>,
        last: bool,
        truncated: bool,
        from: Option<String>,
    ) -> Event {
        let event = BodyChunkEvent {
            correlation_id: self.ex.metadata.correlation_id.clone(),
            data,
            is_last: last,
            total_size: self.total_size,
            chunk_index: s.chunk_index,
            truncated,
            decompressed_from: from,
        };
        match self.direction {
            Direction::Request => Event::RequestBodyChunk(event),
            Direction::Response => Event::ResponseBodyChunk(event),
        }
    }

    /// One streamed chunk.
    async fn stream(
        &mut self,
        s: &mut Stage<'_>,
        chunk: Bytes,
        last: bool,
        limit: u64,
    ) -> Result<Vec<Bytes>, Halt> {
        if s.seen >= limit && !last {
            s.passthrough = true;
            return Ok(vec![chunk]);
        }
        if chunk.is_empty() && !last {
            return Ok(Vec::new());
        }
        s.seen += chunk.len() as u64;
        let event = self.chunk_event(s, chunk.to_vec(), last, false, None);
        s.chunk_index += 1;
        if last {
            s.finished = true;
        }
        let filter = s.filter;
        match filter
            .agent
            .call(event, filter.agent.config.chunk_timeout)
            .await
        {
            Ok(answer) => {
                if let Some(stop) = self.ex.settle(filter, &answer).await {
                    return Err(self.halt(stop));
                }
                Ok(vec![match answer.body_mutation.and_then(|m| m.data) {
                    Some(data) => Bytes::from(data),
                    None => chunk,
                }])
            }
            Err(e) => {
                if let Some(stop) = self.ex.failed(filter, &e) {
                    return Err(self.halt(stop));
                }
                s.passthrough = true;
                Ok(vec![chunk])
            }
        }
    }

    /// A buffered body (or its first `limit` bytes when `truncated`).
    async fn buffered(
        &mut self,
        s: &mut Stage<'_>,
        held: Bytes,
        truncated: bool,
    ) -> Result<Vec<Bytes>, Halt> {
        s.finished = !truncated;
        if held.is_empty() && !truncated && s.chunk_index == 0 && self.total_size == Some(0) {
            return Ok(Vec::new());
        }
        let filter = s.filter;
        let timeout = filter.timeout;
        let (inspected, from) = match &s.kind {
            Kind::Waf {
                decompress: Some(enc),
                on_error,
                limit,
            } => match self.decompress(enc, &held, !truncated, *limit) {
                Ok(Some((plain, name))) => (Bytes::from(plain), Some(name)),
                Ok(None) => (held.clone(), None),
                Err(label) => {
                    if *on_error == FailureMode::Closed {
                        warn!(
                            agent = filter.agent.name(),
                            result = label,
                            "body cannot be decompressed for inspection; refusing it (route fails closed)"
                        );
                        if self.ex.enforce {
                            return Err(self.halt(bad_request()));
                        }
                    }
                    (held.clone(), None)
                }
            },
            _ => (held.clone(), None),
        };
        if let Kind::Guardrail {
            types,
            content_type,
            ..
        } = &s.kind
        {
            let content = String::from_utf8_lossy(&inspected).into_owned();
            for t in types.clone() {
                let event = Event::GuardrailInspect(GuardrailInspectEvent {
                    correlation_id: self.ex.metadata.correlation_id.clone(),
                    inspection_type: t,
                    content: content.clone(),
                    content_type: content_type.clone(),
                    truncated,
                });
                match filter.agent.call(event, timeout).await {
                    Ok(answer) => {
                        if let Some(g) = &answer.guardrail
                            && g.detected
                        {
                            debug!(
                                agent = filter.agent.name(),
                                confidence = g.confidence,
                                "guardrail detection"
                            );
                        }
                        if let Some(stop) = self.ex.settle(filter, &answer).await {
                            return Err(self.halt(stop));
                        }
                    }
                    Err(e) => {
                        if let Some(stop) = self.ex.failed(filter, &e) {
                            return Err(self.halt(stop));
                        }
                        break;
                    }
                }
            }
            return Ok(vec![held]);
        }
        let decompressed = from.is_some();
        let event = self.chunk_event(s, inspected.to_vec(), true, truncated, from);
        s.chunk_index += 1;
        match filter.agent.call(event, timeout).await {
            Ok(answer) => {
                if let Some(stop) = self.ex.settle(filter, &answer).await {
                    return Err(self.halt(stop));
                }
                match answer.body_mutation.and_then(|m| m.data) {
                    Some(_) if truncated || decompressed => {
                        warn!(
                            agent = filter.agent.name(),
                            "body mutation ignored: the agent saw a truncated or decompressed body"
                        );
                        Ok(vec![held])
                    }
                    Some(data) => {
                        self.replaced = true;
                        Ok(vec![Bytes::from(data)])
                    }
                    None => Ok(vec![held]),
                }
            }
            Err(e) => {
                if let Some(stop) = self.ex.failed(filter, &e) {
                    return Err(self.halt(stop));
                }
                Ok(vec![held])
            }
        }
    }

    /// `Ok(None)`: nothing to undo. `Err(label)`: the seed's result label.
    fn decompress(
        &self,
        encoding: &Result<Encoding, String>,
        held: &[u8],
        complete: bool,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, String)>, &'static str> {
        let metrics = &self.ex.context.metrics;
        let cfg = &self.ex.context.waf.body_inspection;
        let encoding = match encoding {
            Ok(e) => *e,
            Err(name) => {
                debug!(encoding = %name, "content encoding cannot be decompressed");
                metrics
                    .decompression
                    .with_label_values(&["other", "invalid_data"])
                    .inc();
                return Err("invalid_data");
            }
        };
        let limits = decompress::Limits {
            max_ratio: cfg.max_decompression_ratio,
            max_output: cfg.max_decompressed_bytes,
        };
        match decompress::decompress(encoding, held, complete, limits) {
            Ok(mut plain) => {
                metrics
                    .decompression
                    .with_label_values(&[encoding.as_str(), "success"])
                    .inc();
                if !held.is_empty() {
                    metrics
                        .decompression_ratio
                        .with_label_values(&[encoding.as_str()])
                        .observe(plain.len() as f64 / held.len() as f64);
                }
                plain.truncate(limit as usize);
                Ok(Some((plain, encoding.as_str().to_owned())))
            }
            Err(e) => {
                metrics
                    .decompression
                    .with_label_values(&[encoding.as_str(), e.label()])
                    .inc();
                Err(e.label())
            }
        }
    }
}

fn bad_request() -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(
            b"bad request: the body cannot be decompressed for inspection\n",
        ))
        .map_err(|never| match never {})
        .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Why an inspected body cannot be forwarded.
pub enum Inspection {
    /// An agent stopped the request with this answer.
    Stopped(Response<ProxyBody>),
    /// The body itself failed (over its limit, the client went away).
    Failed(BoxError),
    /// The inspection did not finish before the request's deadline.
    TimedOut,
}

/// Waits for the first frame of an inspected body: by then every buffering
/// stage has decided. Returns the body to forward, that frame put back in
/// front.
pub async fn first_frame(
    body: ProxyBody,
    stopped: &Stopped,
    until: tokio::time::Instant,
) -> Result<ProxyBody, Inspection> {
    let mut body = body;
    match tokio::time::timeout_at(until, body.frame()).await {
        Err(_) => Err(Inspection::TimedOut),
        Ok(None) => Ok(http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed()),
        Ok(Some(Err(e))) => match stopped.take() {
            Some(response) if is_agent_stop(e.as_ref()) => Err(Inspection::Stopped(response)),
            _ => Err(Inspection::Failed(e)),
        },
        Ok(Some(Ok(frame))) => Ok(Replay {
            first: Some(Ok(frame)),
            rest: body,
        }
        .boxed()),
    }
}

/// A body whose first frame was already read.
struct Replay {
    first: Option<Result<Frame<Bytes>, BoxError>>,
    rest: ProxyBody,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
