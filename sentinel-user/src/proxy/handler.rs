//! One request, from its head to its response head: route it, check its
//! limits, forward it to a target (retrying idempotent requests on another
//! target), and count and log the outcome.

use std::{
    cell::RefCell,
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{self, CONTENT_LENGTH, EXPECT, HOST},
    request::Parts,
};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::Sleep;
use tracing::{debug, info, warn};

use super::{
    ProxyBody, ProxyError, Shared, Snapshot,
    body::{self, BodyError, BodyProgress, Limited, ReadTimeout, Tracked},
    errors, exchange, forward,
    h1::RawFields,
    listener::{Activity, ConnInfo, RequestGuard},
    router::{Action, Route},
    server::{ClientBody, OnUpgrade, Verdict},
    upstream::{InFlight, Upstream},
};
use super::{exchange::Inspection, record::Pending};
use crate::{
    agents::{
        body as agent_body, challenge,
        pipeline::{Exchange, Step},
        websocket,
    },
    config::{AgentEvent, MAX_RETRIES, StaticResponse, UpstreamProtocol},
};

/// A request's answer: its response, the upstream's fields that stayed in
/// its head (see [`RawFields`]), and the request's place in its
/// connection's activity, which the writer holds until the response is
/// written (an HTTP/1 session holds it beside the body, saving the body
/// a box of its own).
pub struct Answer {
    pub response: Response<ProxyBody>,
    pub fields: Option<RawFields>,
    pub guard: Option<RequestGuard>,
}

impl Answer {
    /// The response with all of it inside, for a writer that takes only a
    /// response (hyper's HTTP/2 server).
    pub fn into_response(self) -> Response<ProxyBody> {
        let Answer {
            mut response,
            fields,
            guard,
        } = self;
        if let Some(fields) = fields {
            fields.append_to(response.headers_mut());
        }
        match guard {
            Some(guard) => response.map(|b| Tracked::new(b, guard).boxed()),
            None => response,
        }
    }
}

/// The service function of every connection: `verdict` is what the
/// session found in an HTTP/1 head that must be refused.
pub async fn handle(
    req: Request<ClientBody>,
    verdict: Verdict,
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
) -> Answer {
    let guard = activity.begin();
    let started = Instant::now();
    let snapshot = shared.snapshot.load_full();
    let method = req.method().clone();
    let version = req.version();
    // Kept past the request only for the access log.
    let path = snapshot.access_log.then(|| req.uri().path().to_owned());
    let mut req = req;
    // The HTTP/1 session counts header fields itself; HTTP/2 bounds only
    // the header block's size, so the count is checked here too (before
    // the request id may add one).
    let verdict = match verdict {
        Verdict::Clean if req.headers().len() > snapshot.limits.max_header_count => {
            Verdict::HeadTooLarge
        }
        verdict => verdict,
    };
    let request_id = forward::request_id(req.headers_mut());
    let refused = |error: ProxyError, req: Request<ClientBody>| {
        let (parts, _) = req.into_parts();
        Dispatched {
            route: None,
            outcome: Err((error, Attempt::default())),
            agents: None,
            record: exchange::record(&snapshot, None, &conn, &parts),
        }
    };
    let Dispatched {
        route,
        outcome,
        agents,
        record,
    } = match verdict {
        Verdict::Clean => {
            // The listener's whole-request deadline, when it has one.
            let hard = (!conn.request_timeout.is_zero())
                .then(|| tokio::time::Instant::now() + conn.request_timeout);
            dispatch(req, &conn, &snapshot, &activity, hard, &request_id).await
        }
        Verdict::Smuggling(reason) => refused(
            ProxyError::BadRequest {
                reason: reason.to_owned(),
            },
            req,
        ),
        Verdict::HeadTooLarge => refused(
            ProxyError::HeadTooLarge {
                limit: snapshot.limits.max_header_bytes,
            },
            req,
        ),
    };

    let mut failure = None;
    let (mut response, mut attempt) = match outcome {
        Ok(done) => done,
        Err((error, attempt)) => {
            log_error(&error, &conn, route.as_deref());
            failure = Some(error.to_string());
            (error.response(), attempt)
        }
    };
    if let Some(agents) = &agents {
        agents.exchange.finish_headers(response.headers_mut());
    }
    let route_name = route.as_deref().map(|r| r.name.as_str());
    if snapshot.profiles.secure_headers(route_name) {
        snapshot
            .profiles
            .headers
            .apply(response.headers_mut(), conn.scheme == "https");
    }
    response
        .headers_mut()
        .insert(forward::X_REQUEST_ID.clone(), request_id.clone());
    // The client's protocol, not the upstream's (an HTTP/1.0 upstream must
    // not turn the client's connection into HTTP/1.0).
    *response.version_mut() = version;

    let route_label = route.as_ref().map_or("none", |r| r.name.as_str());
    let status = response.status();
    let metrics = &shared.metrics;
    metrics
        .requests
        .with_label_values(&[route_label, method_label(&method), status.as_str()])
        .inc();
    metrics
        .request_duration
        .with_label_values(&[route_label])
        .observe(started.elapsed().as_secs_f64());
    if snapshot.access_log {
        info!(
            target: "sentinel::access",
            listener = %conn.listener,
            client = %conn.peer.ip(),
            method = %method,
            path = %path.as_deref().unwrap_or_default(),
            version = ?version,
            status = status.as_u16(),
            route = route_label,
            upstream = attempt.upstream_name().unwrap_or("-"),
            // Not `target`: JSON log lines carry the event's target under
            // that key already, and one of the two would be lost.
            upstream_target = attempt.target_address().unwrap_or("-"),
            attempts = attempt.count,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            request_id = request_id.to_str().unwrap_or("-"),
        );
    }
    let completion = agents.as_ref().and_then(|a| a.exchange.completion());
    let done = (completion.is_some() || record.is_some()).then(|| exchange::Done {
        completion,
        record,
        decisions: agents
            .as_ref()
            .map(|a| a.exchange.decisions())
            .unwrap_or_default(),
        started,
        status: status.as_u16(),
        attempts: attempt.count,
        error: failure,
        request_bytes: agents
            .as_ref()
            .map(|a| a.request_bytes.clone())
            .unwrap_or_default(),
    });
    let fields = attempt.fields.take();
    match done {
        Some(done) => Answer {
            response: response
                .map(|b| Tracked::new(exchange::Counted::new(b, done), guard).boxed()),
            fields,
            guard: None,
        },
        None => Answer {
            response,
            fields,
            guard: Some(guard),
        },
    }
}

/// What a request's dispatch decided, and what it leaves for the end.
struct Dispatched {
    route: Option<Arc<Route>>,
    outcome: Outcome,
    agents: Option<exchange::Agents>,
    record: Option<Pending>,
}

/// What the access log says about where a request went: the upstream and
/// the index of its last target tried, named only if the log is written.
#[derive(Default)]
struct Attempt {
    upstream: Option<Arc<Upstream>>,
    target: Option<usize>,
    count: u32,
    /// The response's fields that stayed in the upstream's head.
    fields: Option<RawFields>,
}

impl Attempt {
    fn upstream_name(&self) -> Option<&str> {
        self.upstream.as_ref().map(|u| u.name.as_str())
    }

    fn target_address(&self) -> Option<&str> {
        let (upstream, index) = (self.upstream.as_ref()?, self.target?);
        upstream.targets.get(index).map(|t| t.address.as_str())
    }
}

type Outcome = Result<(Response<ProxyBody>, Attempt), (ProxyError, Attempt)>;

/// The targets an exchange has tried, in order, on the stack: an exchange
/// makes at most `MAX_RETRIES + 1` attempts.
#[derive(Default)]
struct Tried {
    tried: [usize; MAX_RETRIES as usize + 1],
    len: usize,
}

impl Tried {
    fn push(&mut self, index: usize) {
        // Full only past the configured bound, which no exchange reaches.
        if let Some(slot) = self.tried.get_mut(self.len) {
            *slot = index;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[usize] {
        &self.tried[..self.len]
    }
}

async fn dispatch(
    req: Request<ClientBody>,
    conn: &ConnInfo,
    snapshot: &Snapshot,
    activity: &Arc<Activity>,
    hard: Option<tokio::time::Instant>,
    request_id: &HeaderValue,
) -> Dispatched {
    let (mut parts, body) = req.into_parts();
    if parts.uri.path() == challenge::VERIFY_PATH {
        let query = parts.uri.query().unwrap_or("");
        let response = snapshot.agent_context.challenges.verify(
            query,
            exchange::client_ip(conn.peer.ip()),
            conn.scheme == "https",
        );
        return Dispatched {
            route: None,
            outcome: Ok((response, Attempt::default())),
            agents: None,
            record: None,
        };
    }
    let Some(route) = snapshot.router.route(&parts) else {
        return Dispatched {
            route: None,
            outcome: Err((ProxyError::NoRoute, Attempt::default())),
            agents: None,
            record: exchange::record(snapshot, None, conn, &parts),
        };
    };
    let record = exchange::record(snapshot, Some(&route), conn, &parts);
    let agents = exchange::begin(snapshot, &route, conn, &parts, request_id);
    if let Some(a) = &agents {
        let method = parts.method.as_str().to_owned();
        let uri = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        if let Step::Respond(stop) = a
            .exchange
            .request_headers(&method, &uri, &mut parts.headers)
            .await
        {
            return Dispatched {
                route: Some(route),
                outcome: Ok((stop, Attempt::default())),
                agents,
                record,
            };
        }
    }
    let outcome = match &route.action {
        Action::Respond(r) => Ok((static_response(r), Attempt::default())),
        Action::Forward(upstream) => {
            let limit = route
                .policies
                .max_body_bytes
                .unwrap_or(snapshot.limits.max_body_bytes);
            let deadline = route
                .policies
                .timeout
                .unwrap_or(upstream.config.timeouts.total);
            // Nothing on the way back reads or changes the response's
            // fields but the request id: an HTTP/1 client gets them as the
            // upstream sent them.
            let raw_fields = parts.version != Version::HTTP_2
                && agents.is_none()
                && !snapshot.profiles.secure_headers(Some(route.name.as_str()));
            let request = Forwarding {
                conn,
                activity,
                upstream: upstream.clone(),
                limit,
                deadline,
                hard,
                agents: agents.as_ref(),
                record: record.as_ref(),
                raw_fields,
            };
            proxy(parts, body, request).await
        }
    };
    let outcome = match (&agents, outcome) {
        (Some(a), Ok((response, attempt))) => Ok((
            exchange::response(&a.exchange, response, hard).await,
            attempt,
        )),
        (_, other) => other,
    };
    Dispatched {
        route: Some(route),
        outcome,
        agents,
        record,
    }
}

fn static_response(r: &StaticResponse) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(r.body.clone()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Methods whose repetition the client cannot tell apart (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn declared_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Where and under which limits a request is forwarded.
struct Forwarding<'a> {
    conn: &'a ConnInfo,
    activity: &'a Arc<Activity>,
    upstream: Arc<Upstream>,
    /// Request body limit; 0: none.
    limit: u64,
    /// All attempts together (route timeout, else the upstream's total).
    deadline: Duration,
    /// The listener's whole-request deadline.
    hard: Option<tokio::time::Instant>,
    /// The route's agents, when it has some and the profile calls them.
    agents: Option<&'a exchange::Agents>,
    /// The request's metadata record, which sees its body go past.
    record: Option<&'a Pending>,
    /// The response's fields may stay in the upstream's head (see
    /// `h1::RawFields`).
    raw_fields: bool,
}

async fn proxy(mut parts: Parts, body: ClientBody, fwd: Forwarding<'_>) -> Outcome {
    let Forwarding {
        conn,
        activity,
        upstream,
        limit,
        deadline,
        hard,
        agents,
        record,
        raw_fields,
    } = fwd;
    let mut attempt = Attempt {
        upstream: Some(upstream.clone()),
        ..Attempt::default()
    };
    // A body announced over the limit is refused before it is read; with
    // `Expect: 100-continue` the client never sends it.
    if limit != 0 && declared_length(&parts).is_some_and(|n| n > limit) {
        return Err((ProxyError::BodyTooLarge { limit }, attempt));
    }

    let client_upgrade = match (parts.version, forward::upgrade_request(&parts.headers)) {
        (Version::HTTP_11, Some(protocol)) => Some(protocol),
        _ => None,
    };
    let on_client_upgrade = client_upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<OnUpgrade>());

    // The request target's authority wins over `Host` (RFC 9112 §3.2.2),
    // as it did for routing: the upstream must see the host the route
    // was chosen for.
    let original_authority = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(HOST).cloned());
    forward::strip_hop_by_hop(&mut parts.headers, client_upgrade.as_ref());
    // We answer `100-continue` ourselves (the session does when the body
    // is first read); the upstream gets the body without the handshake.
    parts.headers.remove(EXPECT);
    if let Some(authority) = &original_authority {
        parts.headers.insert(HOST, authority.clone());
    }
    parts.version = match upstream.config.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => {
            // `:authority` names the target, whose pooled connection is
            // chosen by it; a `Host` that differs from it makes the request
            // malformed (RFC 9113 §8.3.1). The client's host travels in
            // X-Forwarded-Host and Forwarded.
            parts.headers.remove(HOST);
            Version::HTTP_2
        }
    };

    // Only a request without a body can be sent again: a streamed body is
    // gone once read.
    let empty_body = body.is_end_stream() || body.size_hint().exact() == Some(0);
    let retries = if idempotent(&parts.method) && empty_body && client_upgrade.is_none() {
        upstream.config.retries
    } else {
        0
    };
    // A request with no body and nothing that watches it (agents count
    // it, a record taps it) goes out with none, its wrappers unbuilt.
    let bare = empty_body && agents.is_none() && record.is_none();
    let progress = (!empty_body).then(|| Arc::new(BodyProgress::new()));
    let limited = (!bare).then(|| {
        let limited = Limited::new(body, limit);
        let limited = match &progress {
            Some(progress) => limited.with_progress(progress.clone()),
            None => limited,
        };
        let limited: ProxyBody = match record {
            Some(r) => r.tap(limited).boxed(),
            None => limited.boxed(),
        };
        limited
    });
    let now = tokio::time::Instant::now();
    let give_up_at = {
        let total = now + deadline;
        hard.map_or(total, |hard| total.min(hard))
    };
    // Agents that inspect the body decide on what they buffered before
    // the upstream is asked anything.
    let (mut body, stopped): (Option<ProxyBody>, _) = match (agents, limited) {
        (_, None) => (None, None),
        (Some(a), Some(limited)) if !empty_body => {
            let counted = exchange::count_request(limited, a);
            match exchange::request_body(a, &mut parts.headers, counted, give_up_at).await {
                Ok(inspected) => inspected,
                Err(Inspection::Stopped(response)) => return Ok((response, attempt)),
                Err(Inspection::Failed(e)) => {
                    let error = match body::find_body_error(e.as_ref()) {
                        Some(BodyError::TooLarge { limit }) => {
                            ProxyError::BodyTooLarge { limit: *limit }
                        }
                        Some(other) => ProxyError::BadRequest {
                            reason: other.to_string(),
                        },
                        None => ProxyError::BadRequest {
                            reason: errors::chain(e.as_ref()),
                        },
                    };
                    return Err((error, attempt));
                }
                Err(Inspection::TimedOut) => {
                    return Err((
                        ProxyError::ClientTimeout {
                            after_ms: deadline.as_millis(),
                        },
                        attempt,
                    ));
                }
            }
        }
        (Some(a), Some(limited)) => (Some(exchange::count_request(limited, a)), None),
        (None, limited) => (limited, None),
    };
    // The forwarding fields come last, so that an agent's header changes
    // cannot undo them. When the authority is not text, neither is `Host`,
    // and the host the router saw (`request_host`) is none either: nothing
    // to fall back on.
    let forwarded_host = original_authority.as_ref().and_then(|v| v.to_str().ok());
    let forwarded = forward::forwarding(&mut parts.headers, conn.peer, conn.scheme, forwarded_host);
    let path_and_query = parts.uri.path_and_query().cloned();
    let read_timeout = upstream.config.timeouts.read;
    // The targets tried, on the stack for the usual few attempts.
    let mut tried = Tried::default();
    let mut last_error = None;

    for _ in 0..=retries {
        let Some(index) = upstream.pick(tried.as_slice()) else {
            break;
        };
        tried.push(index);
        attempt.count += 1;
        let target = &upstream.targets[index];
        attempt.target = Some(index);
        let uri: Uri = match target.uri_for(path_and_query.as_ref()) {
            Ok(uri) => uri,
            Err(e) => {
                return Err((
                    ProxyError::BadRequest {
                        reason: format!("request target cannot be forwarded: {e}"),
                    },
                    attempt,
                ));
            }
        };
        parts.uri = uri;
        let outgoing: ProxyBody = match body.take() {
            Some(b) if !empty_body => b,
            _ => Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        };
        let in_flight = InFlight::new(upstream.clone(), index);
        // The first attempt starts when the request did, unless agents
        // took their time with its body first.
        let attempt_started = if attempt.count == 1 && agents.is_none() {
            now
        } else {
            tokio::time::Instant::now()
        };
        // Whoever owes the next bytes has the read timeout to send them:
        // the client while its body is unfinished, the upstream after.
        let owed = || match &progress {
            Some(progress) => progress.owed(),
            None => (false, attempt_started),
        };
        let sent = wait_for_head(
            upstream
                .client
                .send(&parts, &forwarded, outgoing, raw_fields),
            owed,
            read_timeout,
            give_up_at,
        )
        .await;
        let metrics_result;
        let error = match sent {
            Waited::ClientStalled => {
                // Not the target's fault: it is not blamed, and the client
                // gets 408.
                drop(in_flight);
                count_upstream(&upstream, "client_timeout");
                return Err((
                    ProxyError::ClientTimeout {
                        after_ms: read_timeout.as_millis(),
                    },
                    attempt,
                ));
            }
            Waited::Done(Ok((mut response, fields))) => {
                let status = response.status();
                let failed = upstream.config.passive_health.count_5xx
                    && matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    );
                if failed {
                    upstream.record_failure(index);
                } else {
                    upstream.record_success(index);
                }
                count_upstream(&upstream, status_class(status));
                if status == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(on_client) = on_client_upgrade
                {
                    let on_upstream = hyper::upgrade::on(&mut response);
                    let frames = agents
                        .filter(|a| a.exchange.agents.wants(AgentEvent::WebsocketFrame))
                        .map(|a| a.exchange.clone());
                    tokio::spawn(tunnel(
                        on_client,
                        on_upstream,
                        frames,
                        (in_flight, activity.clone()),
                    ));
                    let (head, _) = response.into_parts();
                    let empty = Empty::<Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed();
                    return Ok((Response::from_parts(head, empty), attempt));
                }
                attempt.fields = fields;
                // Hop-by-hop fields are gone already: the client
                // (`HttpClient::send`) drops them.
                let response = response.map(|b| {
                    Tracked::new(
                        ReadTimeout::new(b, read_timeout).with_deadline(hard),
                        in_flight,
                    )
                    .boxed()
                });
                return Ok((response, attempt));
            }
            Waited::Done(Err(e)) => {
                let source: &(dyn std::error::Error + 'static) = &e;
                if agent_body::is_agent_stop(source)
                    && let Some(response) = stopped.as_ref().and_then(|s| s.take())
                {
                    // An agent stopped the streamed body: not the target's
                    // fault.
                    return Ok((response, attempt));
                }
                if let Some(b) = body::find_body_error(source) {
                    // The client's own body failed: not the target's fault.
                    let error = match b {
                        BodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
                        other => ProxyError::BadRequest {
                            reason: other.to_string(),
                        },
                    };
                    return Err((error, attempt));
                }
                if e.is_connect() {
                    metrics_result = "connect_error";
                    ProxyError::Connect {
                        target: target.address.clone(),
                        source: Box::new(e),
                    }
                } else {
                    metrics_result = "error";
                    ProxyError::Upstream {
                        target: target.address.clone(),
                        source: Box::new(e),
                    }
                }
            }
            Waited::UpstreamStalled => {
                metrics_result = "timeout";
                ProxyError::Timeout {
                    target: target.address.clone(),
                    after_ms: attempt_started.elapsed().as_millis(),
                }
            }
        };
        drop(in_flight);
        upstream.record_failure(index);
        count_upstream(&upstream, metrics_result);
        debug!(upstream = %upstream.name, error = %error, "attempt failed");
        last_error = Some(error);
        if tokio::time::Instant::now() >= give_up_at {
            break;
        }
    }
    let error = last_error.unwrap_or_else(|| ProxyError::NoHealthyTarget {
        upstream: upstream.name.clone(),
    });
    Err((error, attempt))
}

enum Waited<T> {
    Done(T),
    /// The client's body stopped for the read timeout.
    ClientStalled,
    /// The upstream sent no response head for the read timeout after the
    /// body ended, or the request's deadline passed.
    UpstreamStalled,
}

/// Waits for the response head, telling who stalled when it does not come.
async fn wait_for_head<F: Future>(
    head: F,
    owed: impl Fn() -> (bool, tokio::time::Instant),
    read: Duration,
    give_up_at: tokio::time::Instant,
) -> Waited<F::Output> {
    let mut head = std::pin::pin!(head);
    let (_, since) = owed();
    let mut timer = HeadTimer::take((since + read).min(give_up_at));
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(out) = head.as_mut().poll(cx) {
                return Poll::Ready(Waited::Done(out));
            }
            if timer.sleep().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = tokio::time::Instant::now();
            // Progress may have come while we slept: look again.
            let (client_owes, since) = owed();
            if now >= since + read || now >= give_up_at {
                return Poll::Ready(if client_owes {
                    Waited::ClientStalled
                } else {
                    Waited::UpstreamStalled
                });
            }
            timer.sleep().reset((since + read).min(give_up_at));
        }
    })
    .await
}

thread_local! {
    /// The head timers of exchanges that ended on this thread, for the
    /// next ones (see [`HeadTimer`]).
    static SPARE_TIMERS: RefCell<Vec<Pin<Box<Sleep>>>> = const { RefCell::new(Vec::new()) };
}

/// The most spare head timers a thread keeps.
const SPARE_TIMERS_MAX: usize = 1024;

/// The timer an exchange waits for its response head under.
///
/// A timer made for each exchange went into tokio's timer wheel and out
/// again (its registration and removal, each under the driver's lock:
/// about 280 instructions a request more than a spare, callgrind). A timer that an earlier
/// exchange left is still registered, its deadline a read timeout after
/// that exchange began; moved later for the next exchange, it is only an
/// atomic update. One that fires while it waits wakes the task that last
/// polled it, which finds nothing to do, and is registered again when it
/// is next used.
struct HeadTimer(Option<Pin<Box<Sleep>>>);

impl HeadTimer {
    fn take(at: tokio::time::Instant) -> Self {
        let spare = SPARE_TIMERS.with(|spares| spares.borrow_mut().pop());
        let sleep = match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        Self(Some(sleep))
    }

    fn sleep(&mut self) -> Pin<&mut Sleep> {
        // Present until dropped.
        self.0
            .as_mut()
            .map(Pin::as_mut)
            .expect("a head timer until it is dropped")
    }
}

impl Drop for HeadTimer {
    fn drop(&mut self) {
        let Some(sleep) = self.0.take() else { return };
        // `try_with`: a thread that is exiting keeps nothing.
        let _ = SPARE_TIMERS.try_with(|spares| {
            if let Ok(mut spares) = spares.try_borrow_mut()
                && spares.len() < SPARE_TIMERS_MAX
            {
                spares.push(sleep);
            }
        });
    }
}

/// Copies bytes both ways between an upgraded client and upstream (a
/// WebSocket, say) until either side closes.
async fn tunnel(
    client: OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    // Agents that inspect WebSocket frames, when the route has some.
    frames: Option<Arc<Exchange>>,
    // The target's in-flight count and the client connection's place under
    // the caps, held while the tunnel lives.
    _held: (InFlight, Arc<Activity>),
) {
    let (client, upstream) = tokio::join!(client.upgraded(), upstream);
    let (mut client, upstream) = match (client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(error), _) => {
            debug!(%error, "upgrade did not complete");
            return;
        }
        (_, Err(error)) => {
            debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Some(exchange) = frames {
        websocket::tunnel(exchange, client, upstream).await;
        return;
    }
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        debug!(%error, "upgraded connection ended");
    }
}

fn count_upstream(upstream: &Upstream, result: &str) {
    upstream.count(result);
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Method label: the standard methods by name, anything else as OTHER, so
/// clients cannot grow the metric's label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

fn log_error(error: &ProxyError, conn: &ConnInfo, route: Option<&Route>) {
    let route = route.map_or("none", |r| r.name.as_str());
    match error {
        ProxyError::NoRoute
        | ProxyError::BodyTooLarge { .. }
        | ProxyError::HeadTooLarge { .. }
        | ProxyError::BadRequest { .. } => {
            debug!(client = %conn.peer, route, error = %errors::chain(error), "request refused")
        }
        _ => warn!(client = %conn.peer, route, error = %errors::chain(error), "request failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_RETRIES, Tried};

    #[test]
    fn tried_targets_keep_their_order() {
        let mut tried = Tried::default();
        assert!(tried.as_slice().is_empty());
        let attempts = MAX_RETRIES as usize + 1;
        for i in 0..attempts {
            tried.push(i * 3);
            let expected: Vec<usize> = (0..=i).map(|k| k * 3).collect();
            assert_eq!(tried.as_slice(), expected.as_slice());
        }
        // Past the bound (which no exchange reaches) nothing is lost or
        // overwritten.
        tried.push(1);
        assert_eq!(tried.as_slice().len(), attempts);
        assert_eq!(tried.as_slice()[attempts - 1], (attempts - 1) * 3);
    }
}
