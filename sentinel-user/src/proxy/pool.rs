//! HTTP/1.1 connections to upstream targets: pooled per target, and driven
//! by the request that uses them rather than by a task of their own.
//!
//! hyper-util's pooling client runs each upstream connection as a task
//! and reaches it through channels: a proxied request paid for a pool
//! checkout keyed by a hashed (scheme, authority), a wake-up of the
//! connection's task to write the request and one of the request's task
//! for the answer, and a task spawned to wait for the connection to
//! become idle again. Here the request's own task polls the connection:
//! while it waits for the response head ([`Pool::send`]) and, when the
//! body is not already buffered, while the response body streams
//! ([`Driven`]), which hands the connection back when the body ends. A
//! task per pool looks after idle connections: it closes those idle past
//! the timeout or closed by the target.
//!
//! HTTP/2 upstreams keep hyper-util's client: one multiplexed connection
//! per target, whose own task is shared by every request on it.

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
    HeaderValue, Method, Request, Response, Uri,
    header::{HOST, UPGRADE},
    uri::{Authority, Parts, Scheme},
};
use http_body::{Body, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{TrySendError, http1},
};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioIo};
use tokio::net::TcpStream;
use tower_service::Service;
use tracing::debug;

use super::{ProxyBody, body::BoxError};

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect")]
    Connect {
        #[source]
        source: BoxError,
    },
    #[error("request failed")]
    Request {
        #[source]
        source: hyper::Error,
    },
    #[error("the connection closed before it took the request")]
    Closed,
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
            ClientError::Request { .. } | ClientError::Closed => false,
            ClientError::Pooled { source } => source.is_connect(),
        }
    }
}

/// One upstream connection: its sender and the future that drives it.
/// The driver (hyper's connection state and buffers, about a kilobyte)
/// is boxed, so that handing the connection around moves a pointer.
struct Conn {
    sender: http1::SendRequest<ProxyBody>,
    driver: Box<http1::Connection<Io, ProxyBody>>,
    /// The driver finished: the connection is closed or failed.
    closed: bool,
}

impl Conn {
    /// Lets the connection read and write what it can.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.closed
            && let Poll::Ready(result) = Pin::new(&mut *self.driver).poll(cx)
        {
            if let Err(error) = result {
                debug!(%error, "upstream connection ended with an error");
            }
            self.closed = true;
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
    /// A request that a reused connection closed before sending is sent
    /// again on another one, as hyper-util's client does.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Driven>, ClientError> {
        let target = self.target_of(req.uri());
        let connect_to = scheme_and_authority(req.uri());
        to_http1_form(&mut req);
        // An upgrade's connection leaves the pool: it runs on its own and
        // hands its socket to the upgrade when the target switches.
        let upgrade = req.headers().contains_key(UPGRADE);
        loop {
            let (mut conn, reused) = match target.and_then(|t| self.checkout(t)) {
                Some(conn) => (conn, true),
                None => (self.connect(&connect_to).await?, false),
            };
            // A connection not ready for a request is finishing the last
            // exchange (or was closed): let it. One closed by the target
            // while idle is found by the poll that would write the request,
            // which reads first and hands the request back unsent.
            let ready = conn.sender.is_ready()
                || std::future::poll_fn(|cx| {
                    conn.drive(cx);
                    if conn.closed {
                        return Poll::Ready(false);
                    }
                    conn.sender.poll_ready(cx).map(|r| r.is_ok())
                })
                .await;
            if !ready {
                if reused {
                    continue;
                }
                return Err(ClientError::Closed);
            }
            if upgrade {
                let Conn {
                    mut sender, driver, ..
                } = conn;
                tokio::spawn(async move {
                    if let Err(error) = (*driver).with_upgrades().await {
                        debug!(%error, "upstream connection ended with an error");
                    }
                });
                return match sender.try_send_request(req).await {
                    Ok(response) => Ok(response.map(|body| Driven::new(body, None))),
                    Err(e) => Err(ClientError::Request {
                        source: e.into_error(),
                    }),
                };
            }
            let sent = conn.sender.try_send_request(req);
            let mut sent = std::pin::pin!(sent);
            // The connection writes the request and reads the answer when
            // polled: poll it, then the answer.
            let answer = std::future::poll_fn(|cx| {
                conn.drive(cx);
                sent.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(response) => {
                    let home = target.map(|t| (self.clone(), t));
                    return Ok(response.map(|body| Driven::new(body, Some(Lease { conn, home }))));
                }
                Err(e) => {
                    let mut e: TrySendError<Request<ProxyBody>> = e;
                    match e.take_message() {
                        Some(unsent) if reused => {
                            debug!(
                                "idle upstream connection closed before the request was sent; trying another"
                            );
                            req = unsent;
                        }
                        _ => {
                            return Err(ClientError::Request {
                                source: e.into_error(),
                            });
                        }
                    }
                }
            }
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
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() < self.idle_timeout && !entry.conn.closed {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, target: usize, conn: Conn) {
        if conn.closed || self.max_idle == 0 {
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

    async fn connect(&self, uri: &Uri) -> Result<Conn, ClientError> {
        let connect = |source| ClientError::Connect { source };
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(connect)?;
        let io = connector.call(uri.clone()).await.map_err(connect)?;
        let (sender, driver) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| connect(Box::new(e)))?;
        Ok(Conn {
            sender,
            driver: Box::new(driver),
            closed: false,
        })
    }
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
                entry.conn.drive(cx);
                !entry.conn.closed && entry.since.elapsed() < pool.idle_timeout
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

/// What hyper-util's client did to an HTTP/1 request: `Host` from the
/// URI when the request has none, and the request target in origin form
/// (authority form for CONNECT).
fn to_http1_form(req: &mut Request<ProxyBody>) {
    let uri = req.uri().clone();
    if !req.headers().contains_key(HOST)
        && let Some(host) = uri.host()
    {
        let default_port = match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        };
        let value = match uri.port_u16() {
            Some(port) if port != default_port => HeaderValue::try_from(format!("{host}:{port}")),
            _ => HeaderValue::try_from(host),
        };
        if let Ok(value) = value {
            req.headers_mut().insert(HOST, value);
        }
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

/// A response body from an upstream, and the connection it arrives on:
/// polling the body drives the connection, and the connection goes back
/// to its pool when the body has ended.
pub struct Driven {
    body: Incoming,
    conn: Option<Lease>,
}

/// A connection out of its pool, and where it goes back (none for a
/// request whose URI named no target of the pool).
struct Lease {
    conn: Conn,
    home: Option<(Arc<Pool>, usize)>,
}

impl Driven {
    fn new(body: Incoming, conn: Option<Lease>) -> Self {
        Self { body, conn }
    }

    /// A body driven by its connection's own task (HTTP/2, upgrades).
    pub fn detached(body: Incoming) -> Self {
        Self { body, conn: None }
    }

    fn release(&mut self) {
        if let Some(Lease {
            conn,
            home: Some((pool, target)),
        }) = self.conn.take()
        {
            pool.put(target, conn);
        }
    }
}

impl Body for Driven {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending()
            && let Some(Lease { conn, .. }) = &mut this.conn
        {
            // Nothing buffered: let the connection read, then look again.
            conn.drive(cx);
            polled = Pin::new(&mut this.body).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            // A body that failed leaves its connection unusable.
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
