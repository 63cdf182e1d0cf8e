//! Where the proxy hands a request to its route's agents: whether they are
//! called at all (the profile's mode), the request body before it is
//! forwarded, the response before the client gets it, and the
//! `request_complete` event once the response body is done.

use std::{
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Response, StatusCode,
    header::{CONTENT_LENGTH, CONTENT_TYPE},
    request::Parts,
};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use super::{
    BoxError, ProxyBody, Snapshot, forward,
    listener::ConnInfo,
    record::{Ending, Pending},
    router::Route,
};
pub use crate::agents::body::Inspection;
use crate::{
    agents::{
        body::{self, Direction, Plan, Stopped},
        pipeline::{Completion, Exchange, Outcome, Step},
    },
    config::{AgentEvent, ProfileMode},
};

/// A request's agents and what the proxy counts for them.
pub struct Agents {
    pub exchange: Arc<Exchange>,
    /// Request body bytes read from the client.
    pub request_bytes: Arc<AtomicU64>,
}

/// The address the kernel sees: IPv4 clients of a dual-stack socket as
/// IPv4.
pub fn client_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The route's agents for this request, unless it has none or the profile
/// mode calls no agents (`off`, `lite`).
pub fn begin(
    snapshot: &Snapshot,
    route: &Route,
    conn: &ConnInfo,
    parts: &Parts,
    request_id: &HeaderValue,
) -> Option<Agents> {
    let enforce = match snapshot.profiles.mode(Some(&route.name)) {
        ProfileMode::Off | ProfileMode::Lite => return None,
        ProfileMode::Monitor => false,
        ProfileMode::Protection => true,
    };
    let agents = snapshot.route_agents.get(&route.name)?.clone();
    let client = client_ip(conn.peer.ip());
    let upstream = match &route.action {
        super::router::Action::Forward(u) => Some(u.name.as_str()),
        super::router::Action::Respond(_) => None,
    };
    // Filled into a recycled metadata (see `pipeline::spare_metadata`): no
    // allocation once the thread has one, and no `fmt` (its machinery was
    // a third of this function's work).
    let mut metadata = crate::agents::pipeline::spare_metadata();
    {
        let m = &mut metadata;
        let mut buf = uuid::Uuid::encode_buffer();
        set(
            &mut m.correlation_id,
            uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf),
        );
        set(&mut m.request_id, request_id.to_str().unwrap_or_default());
        let mut ip = forward::IpText::new();
        ip.write(client);
        set(&mut m.client_ip, ip.as_str());
        m.client_port = conn.peer.port();
        set_opt(
            &mut m.server_name,
            super::router::request_host(parts).as_deref(),
        );
        set(&mut m.protocol, protocol(parts.version));
        m.tls_version = None;
        set_opt(&mut m.route_id, Some(&route.name));
        set_opt(&mut m.upstream_id, upstream);
        set_opt(&mut m.listener, Some(&conn.listener));
        m.timestamp.clear();
        super::record::rfc3339_millis_string(&mut m.timestamp, std::time::SystemTime::now());
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    Some(Agents {
        exchange: Arc::new(Exchange::new(
            agents,
            snapshot.agent_context.clone(),
            metadata,
            client,
            enforce,
            target,
            &parts.headers,
        )),
        request_bytes: Arc::new(AtomicU64::new(0)),
    })
}

fn set(to: &mut String, value: &str) {
    to.clear();
    to.push_str(value);
}

fn set_opt(to: &mut Option<String>, value: Option<&str>) {
    match value {
        Some(value) => set(to.get_or_insert_with(String::new), value),
        None => *to = None,
    }
}

/// Counts the client's body bytes for `request_complete`.
pub fn count_request<B>(body: B, agents: &Agents) -> ProxyBody
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
{
    Counting {
        inner: body,
        count: agents.request_bytes.clone(),
    }
    .boxed()
}

pin_project! {
    struct Counting<B> {
        #[pin]
        inner: B,
        count: Arc<AtomicU64>,
    }
}

impl<B: Body<Data = Bytes>> Body for Counting<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Runs the request-body agents. `Ok((body, stopped))`: the body to
/// forward, and where a decision taken later in a streamed body is left.
pub async fn request_body(
    agents: &Agents,
    headers: &mut HeaderMap,
    body: ProxyBody,
    until: tokio::time::Instant,
) -> Result<(Option<ProxyBody>, Option<Arc<Stopped>>), Inspection> {
    let ex = &agents.exchange;
    let wants =
        ex.agents.wants(AgentEvent::RequestBody) || ex.agents.wants(AgentEvent::GuardrailInspect);
    let plan = match wants
        .then(|| Plan::new(ex, Direction::Request, headers))
        .flatten()
    {
        Some(plan) => plan,
        None => return Ok((Some(body), None)),
    };
    let streams = plan.streams();
    let total = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let (inspected, stopped) = body::run(ex.clone(), plan, Direction::Request, body, total);
    let forwarded = body::first_frame(inspected, &stopped, until).await?;
    fix_length(headers, streams, &stopped);
    Ok((Some(forwarded), Some(stopped)))
}

/// A body whose stages may rewrite it after its head is sent goes without
/// a length; a buffered one that was rewritten gets its new length.
fn fix_length(headers: &mut HeaderMap, streams: bool, stopped: &Stopped) {
    if streams {
        headers.remove(CONTENT_LENGTH);
    } else if let Some(n) = stopped.new_length() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// No body to inspect: HEAD answers, 1xx, 204 and 304 carry none.
fn has_body(response: &Response<ProxyBody>) -> bool {
    let s = response.status();
    !(s.is_informational()
        || s == StatusCode::NO_CONTENT
        || s == StatusCode::NOT_MODIFIED
        || response.body().is_end_stream())
}

/// Runs the response agents: headers, then body. A stop replaces the
/// upstream's response.
pub async fn response(
    ex: &Arc<Exchange>,
    response: Response<ProxyBody>,
    hard: Option<tokio::time::Instant>,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let (mut head, body) = response.into_parts();
    if ex.agents.wants(AgentEvent::ResponseHeaders)
        && let Step::Respond(stop) = ex.response_headers(head.status, &mut head.headers).await
    {
        return stop;
    }
    let response = Response::from_parts(head, body);
    if !ex.agents.wants(AgentEvent::ResponseBody) || !has_body(&response) {
        return response;
    }
    let (mut head, body) = response.into_parts();
    let Some(plan) = Plan::new(ex, Direction::Response, &head.headers) else {
        return Response::from_parts(head, body);
    };
    let streams = plan.streams();
    let total = head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let (inspected, stopped) = body::run(ex.clone(), plan, Direction::Response, body, total);
    // The listener's deadline, else a generous bound: every agent call in
    // the stages has its own timeout.
    let until =
        hard.unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(300));
    match body::first_frame(inspected, &stopped, until).await {
        Ok(forwarded) => {
            fix_length(&mut head.headers, streams, &stopped);
            Response::from_parts(head, forwarded)
        }
        Err(Inspection::Stopped(stop)) => stop,
        Err(Inspection::Failed(_)) | Err(Inspection::TimedOut) => {
            let mut r = Response::new(
                http_body_util::Full::new(Bytes::from_static(
                    b"bad gateway: the upstream's response could not be inspected\n",
                ))
                .map_err(|never| match never {})
                .boxed(),
            );
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
    }
}

/// A record for this request, when its mode records and the record goes
/// somewhere (the store, or the route's log agents).
pub fn record(
    snapshot: &Snapshot,
    route: Option<&Route>,
    conn: &ConnInfo,
    parts: &Parts,
) -> Option<Pending> {
    let recorder = snapshot.recorder.as_ref()?;
    let name = route.map(|r| r.name.as_str());
    let mode = snapshot.profiles.mode(name);
    if mode == ProfileMode::Off {
        return None;
    }
    let to_agents = name
        .and_then(|n| snapshot.route_agents.get(n))
        .is_some_and(|a| a.wants(AgentEvent::Log));
    if recorder.store().is_none() && !to_agents {
        return None;
    }
    Some(recorder.begin(mode, name, parts, client_ip(conn.peer.ip()), conn.scheme))
}

/// What `request_complete` and the record report, gathered as the request
/// went.
pub struct Done {
    pub completion: Option<Completion>,
    pub record: Option<Pending>,
    /// The decisions of the request's agents.
    pub decisions: Vec<sentinel_agent_protocol::DecisionRecord>,
    pub started: Instant,
    pub status: u16,
    pub attempts: u32,
    pub error: Option<String>,
    pub request_bytes: Arc<AtomicU64>,
}

pin_project! {
    /// The response body to the client: counts its bytes and sends
    /// `request_complete` when it ends (or is dropped: the client left).
    pub struct Counted<B> {
        #[pin]
        inner: B,
        done: Option<Done>,
        sent: u64,
    }

    impl<B> PinnedDrop for Counted<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.done.take() {
                finish(done, *this.sent, Some("the client went away".to_owned()));
            }
        }
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, done: Done) -> Self {
        Self {
            inner,
            done: Some(done),
            sent: 0,
        }
    }
}

fn finish(done: Done, sent: u64, cut: Option<String>) {
    let error = done.error.or(cut);
    let wanted = done.completion.is_some();
    let record = done.record.and_then(|pending| {
        pending.store(
            Ending {
                status: done.status,
                duration: done.started.elapsed(),
                response_bytes: sent,
                decisions: serde_json::to_value(&done.decisions).unwrap_or_default(),
                error: error.clone(),
            },
            wanted,
        )
    });
    if let Some(completion) = done.completion {
        completion.send(Outcome {
            status: done.status,
            duration: done.started.elapsed(),
            request_body_size: done.request_bytes.load(Ordering::Relaxed),
            response_body_size: sent,
            upstream_attempts: done.attempts,
            error,
            record,
        });
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.sent += data.len() as u64;
                }
                // hyper stops polling a body that says it has ended.
                if inner.is_end_stream()
                    && let Some(done) = this.done.take()
                {
                    finish(done, *this.sent, None);
                }
            }
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    finish(done, *this.sent, None);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(done) = this.done.take() {
                    finish(
                        done,
                        *this.sent,
                        Some("the response body failed".to_owned()),
                    );
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
