//! HTTP/1.1 connections to upstream targets: pooled per target, and driven
//! by the request that uses them rather than by a task of their own.
//!
//! hyper-util's pooling client runs each upstream connection as a task
//! and reaches it through channels: a proxied request paid for a pool
//! checkout keyed by a hashed (scheme, authority), a wake-up of the
//! connection's task to write the request and one of the request's task
//! for the answer, and a task spawned to wait for the connection to
//! become idle again. Here the request's own task writes the request and
//! reads the answer on the connection (`h1.rs`), and, when the body is
//! not already buffered, reads the response body as it is polled
//! ([`Driven`]), which hands the connection back when the body ends. A
//! task per pool looks after idle connections: it closes those idle past
//! the timeout or closed by the target.
//!
//! Upgrades and CONNECT take a connection of their own, driven by hyper's
//! client in a task, which hands the socket over when the target switches
//! protocols. HTTP/2 upstreams keep hyper-util's client: one multiplexed
//! connection per target, whose own task is shared by every request on
//! it.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderValue, Method, Request, Response, StatusCode, Uri,
    header::{HOST, UPGRADE},
    uri::{Authority, Parts, Scheme},
};
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioIo};
use tokio::net::TcpStream;
use tower_service::Service;
use tracing::debug;

use super::{
    ProxyBody,
    body::BoxError,
    forward::{self, Forwarded},
    h1::{self, ResponseBody},
};

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Conn = h1::Conn<Io>;

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect")]
    Connect {
        #[source]
        source: BoxError,
    },
    #[error("request failed")]
    Exchange {
        #[source]
        source: h1::Error,
    },
    #[error("request failed")]
    Request {
        #[source]
        source: hyper::Error,
    },
    #[error("request failed")]
    Pooled {
        #[source]
        source: hyper_util::client::legacy::Error,
    },
}

impl ClientError {
    /// The target could not be reached (no connection was made).
    pub fn is_connect(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Exchange { .. } | ClientError::Request { .. } => false,
            ClientError::Pooled { source } => source.is_connect(),
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The HTTP/1.1 connections of one upstream, per target.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Per target: its scheme and authority, to find its idle
    /// connections from a request's URI, and its idle connections.
    targets: Vec<(Scheme, Authority, Mutex<Vec<Idle>>)>,
    max_idle: usize,
    idle_timeout: Duration,
    keeper: AtomicBool,
}

impl Pool {
    /// `targets` are the upstream's `scheme://host:port` URIs.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        targets: &[Uri],
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        let targets = targets
            .iter()
            .filter_map(|uri| {
                Some((
                    uri.scheme()?.clone(),
                    uri.authority()?.clone(),
                    Mutex::new(Vec::new()),
                ))
            })
            .collect();
        Self {
            connector,
            targets,
            max_idle,
            idle_timeout,
            keeper: AtomicBool::new(false),
        }
    }

    /// Sends `req` (an absolute URI naming a target) on an idle connection
    /// to its target, or a new one; the response once its head arrived.
    /// A request without a body that a reused connection failed before
    /// any of it was written is sent again on another one. With `raw`, the
    /// response's fields may come as [`h1::RawFields`].
    pub async fn send(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        forwarded: &Forwarded,
        mut body: ProxyBody,
        raw: bool,
    ) -> Result<(Response<Driven>, Option<h1::RawFields>), ClientError> {
        let target = self.target_of(&parts.uri);
        if parts.headers.contains_key(UPGRADE) || parts.method == Method::CONNECT {
            let mut req = Request::from_parts(parts.clone(), body);
            forwarded.apply(req.headers_mut());
            to_http1_form(&mut req);
            return self
                .send_detached(req, &scheme_and_authority(&parts.uri))
                .await
                .map(|response| (response, None));
        }
        let host = (!parts.headers.contains_key(HOST))
            .then(|| host_of(&parts.uri))
            .flatten();
        loop {
            let (conn, reused) = match target.and_then(|t| self.checkout(t)) {
                Some(conn) => (conn, true),
                // The URI to connect to is built only when a connection is.
                None => {
                    let io = self.connect(&scheme_and_authority(&parts.uri)).await?;
                    (Conn::new(io), false)
                }
            };
            let empty = body.is_end_stream();
            match conn
                .send(parts, host.as_ref(), forwarded.lines(), body, raw)
                .await
            {
                Ok((response, fields)) => {
                    let home = target.map(|t| (self.clone(), t));
                    let response = response.map(|body| {
                        let mut driven = Driven {
                            body: Inner::Own { body, home },
                        };
                        driven.release();
                        driven
                    });
                    return Ok((response, fields));
                }
                Err(failed) if reused && empty && !failed.sent => {
                    debug!(
                        error = %failed.error,
                        "idle upstream connection failed before the request was sent; trying another"
                    );
                    body = empty_body();
                }
                Err(failed) => {
                    return Err(ClientError::Exchange {
                        source: failed.error,
                    });
                }
            }
        }
    }

    /// Sends an upgrade or CONNECT on a connection of its own, driven by
    /// hyper in a task that hands the socket to the upgrade.
    async fn send_detached(
        &self,
        req: Request<ProxyBody>,
        connect_to: &Uri,
    ) -> Result<Response<Driven>, ClientError> {
        let io = self.connect(connect_to).await?;
        let (mut sender, driver) =
            http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| ClientError::Connect {
                    source: Box::new(e),
                })?;
        tokio::spawn(async move {
            if let Err(error) = driver.with_upgrades().await {
                debug!(%error, "upstream connection ended with an error");
            }
        });
        match sender.send_request(req).await {
            Ok(mut response) => {
                // A switch keeps its handshake for the client.
                if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                    forward::strip_hop_by_hop(response.headers_mut(), None);
                }
                Ok(response.map(Driven::detached))
            }
            Err(source) => Err(ClientError::Request { source }),
        }
    }

    fn target_of(&self, uri: &Uri) -> Option<usize> {
        let authority = uri.authority()?;
        self.targets
            .iter()
            .position(|(scheme, a, _)| a == authority && Some(scheme) == uri.scheme())
    }

    /// The most recently used idle connection to `target` that is not
    /// past the idle timeout.
    fn checkout(&self, target: usize) -> Option<Conn> {
        let (_, _, idle) = self.targets.get(target)?;
        let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut entry) = idle.pop() {
            if entry.since.elapsed() < self.idle_timeout && usable(&mut entry.conn) {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, target: usize, conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        let Some((_, _, idle)) = self.targets.get(target) else {
            return;
        };
        {
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() >= self.max_idle {
                return;
            }
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        if !self.keeper.swap(true, Ordering::Relaxed) {
            tokio::spawn(keep(Arc::downgrade(self)));
        }
    }

    async fn connect(&self, uri: &Uri) -> Result<Io, ClientError> {
        let connect = |source| ClientError::Connect { source };
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(connect)?;
        connector.call(uri.clone()).await.map_err(connect)
    }
}

/// Whether an idle connection can take a request now: the target has not
/// closed it. Costs no system call when nothing arrived on it.
fn usable(conn: &mut Conn) -> bool {
    let waker = std::task::Waker::noop();
    conn.poll_idle(&mut Context::from_waker(waker))
}

/// Polls the pool's idle connections, so that those the target closes
/// are noticed, and drops those idle past the timeout, until the pool is
/// gone.
async fn keep(pool: Weak<Pool>) {
    let period = match pool.upgrade() {
        Some(pool) => (pool.idle_timeout / 2).max(Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    std::future::poll_fn(|cx| {
        let Some(pool) = pool.upgrade() else {
            return Poll::Ready(());
        };
        while tick.poll_tick(cx).is_ready() {}
        for (_, _, idle) in &pool.targets {
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain_mut(|entry| {
                entry.conn.poll_idle(cx) && entry.since.elapsed() < pool.idle_timeout
            });
        }
        Poll::Pending
    })
    .await
}

fn scheme_and_authority(uri: &Uri) -> Uri {
    let mut parts = Parts::default();
    parts.scheme = uri.scheme().cloned();
    parts.authority = uri.authority().cloned();
    parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    Uri::from_parts(parts).unwrap_or_default()
}

/// The `Host` of a request to `uri` that has none: its host, and its port
/// unless it is the scheme's default.
fn host_of(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match uri.port_u16() {
        Some(port) if port != default_port => HeaderValue::try_from(format!("{host}:{port}")),
        _ => HeaderValue::try_from(host),
    }
    .ok()
}

/// What hyper-util's client did to an HTTP/1 request: `Host` from the
/// URI when the request has none, and the request target in origin form
/// (authority form for CONNECT). The proxy's own codec does the same as
/// it writes the head (`h1.rs`); hyper's client, for upgrades and
/// CONNECT, needs it done to the request.
fn to_http1_form(req: &mut Request<ProxyBody>) {
    let uri = req.uri().clone();
    if !req.headers().contains_key(HOST)
        && let Some(value) = host_of(&uri)
    {
        req.headers_mut().insert(HOST, value);
    }
    let mut parts = Parts::default();
    if req.method() == Method::CONNECT {
        parts.authority = uri.authority().cloned();
    } else {
        parts.path_and_query = uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
    }
    if let Ok(form) = Uri::from_parts(parts) {
        *req.uri_mut() = form;
    }
}

fn empty_body() -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A response body from an upstream. One read on a pooled connection goes
/// back to its pool when it has ended (`home`: none for a request whose
/// URI named no target of the pool); one driven by its connection's own
/// task (HTTP/2, upgrades) is hyper's.
pub struct Driven {
    body: Inner,
}

enum Inner {
    Own {
        body: ResponseBody<Io>,
        home: Option<(Arc<Pool>, usize)>,
    },
    Hyper(Incoming),
}

impl Driven {
    /// A body driven by its connection's own task (HTTP/2, upgrades).
    pub fn detached(body: Incoming) -> Self {
        Self {
            body: Inner::Hyper(body),
        }
    }

    /// Gives the connection back once the body has ended.
    fn release(&mut self) {
        if let Inner::Own {
            body,
            home: Some((pool, target)),
        } = &mut self.body
            && let Some(conn) = body.reusable()
        {
            pool.put(*target, conn);
        }
    }
}

impl Body for Driven {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut self.body {
            Inner::Own { body, .. } => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        };
        if let Poll::Ready(None | Some(Ok(_))) = &polled {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Inner::Own { body, .. } => body.is_end_stream(),
            Inner::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Inner::Own { body, .. } => body.size_hint(),
            Inner::Hyper(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    fn request(method: &str, uri: &str, host: Option<&str>) -> Request<ProxyBody> {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        builder
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .expect("a valid request")
    }

    #[test]
    fn a_missing_host_is_the_target_without_its_default_port() {
        let host = |uri: &str| host_of(&uri.parse().expect("uri")).expect("a host");
        assert_eq!(host("http://10.0.0.1:8080/x"), "10.0.0.1:8080");
        assert_eq!(host("http://10.0.0.1:80/x"), "10.0.0.1");
        assert_eq!(host("https://upstream.test:443/"), "upstream.test");
        assert_eq!(host("https://upstream.test:8443/"), "upstream.test:8443");
    }

    #[test]
    fn requests_go_out_in_origin_form_with_a_host() {
        let mut req = request("GET", "http://10.0.0.1:8080/a/b?c=1", None);
        to_http1_form(&mut req);
        assert_eq!(req.uri(), "/a/b?c=1");
        assert_eq!(req.headers()[HOST], "10.0.0.1:8080");

        // The client's Host stays; default ports are left out.
        let mut req = request("GET", "http://10.0.0.1:80/", Some("example.com"));
        to_http1_form(&mut req);
        assert_eq!(req.uri(), "/");
        assert_eq!(req.headers()[HOST], "example.com");
        let mut req = request("GET", "https://upstream.test:443/x", None);
        to_http1_form(&mut req);
        assert_eq!(req.headers()[HOST], "upstream.test");

        let mut req = request("CONNECT", "http://10.0.0.1:8443/", None);
        to_http1_form(&mut req);
        assert_eq!(req.uri(), "10.0.0.1:8443");
    }

    #[test]
    fn targets_are_found_by_scheme_and_authority() {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(super::super::tls::client_config(None).expect("a client TLS config"))
            .https_or_http()
            .enable_http1()
            .build();
        let targets: Vec<Uri> = ["http://10.0.0.1:80", "https://10.0.0.2:443"]
            .iter()
            .map(|t| t.parse().expect("uri"))
            .collect();
        let pool = Pool::new(connector, &targets, 4, Duration::from_secs(60));
        let find = |uri: &str| pool.target_of(&uri.parse().expect("uri"));
        assert_eq!(find("http://10.0.0.1:80/x"), Some(0));
        assert_eq!(find("https://10.0.0.2:443/"), Some(1));
        assert_eq!(find("http://10.0.0.2:443/"), None, "the scheme counts");
        assert_eq!(find("/relative"), None);
    }
}
