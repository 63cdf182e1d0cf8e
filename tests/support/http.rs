//! HTTP on both sides of the proxy, for the proxy tests: [`Upstream`], a
//! backend that records what reaches it and answers as the request's query
//! asks; clients over any connection, HTTP/1.1 or HTTP/2 ([`send_on`],
//! [`fetch`], [`h2c`], [`tls_connect`]); and [`Raw`], for bytes no
//! well-behaved client would send.
//!
//! Everything here runs on the calling test's Tokio runtime, which must be
//! multi-threaded: the test body blocks its thread while it talks to the
//! daemon's CLI, and the upstreams keep serving on the workers meanwhile.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::{ClientConfig, pki_types::ServerName};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

mod raw;

pub use raw::{Raw, RawResponse, exchange, status_of};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies the test clients and the upstream send.
pub type Body = BoxBody<Bytes, BoxError>;

/// How long one client exchange may take before the test fails.
pub const STEP: Duration = Duration::from_secs(30);

/// The `Host` the clients send unless told otherwise.
pub const HOST: &str = "test.local";

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// The request URI's authority (HTTP/2 `:authority`), if any.
    pub authority: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_bytes: u64,
    /// Whether the body arrived whole (framing intact, not cut short).
    pub complete: bool,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct State {
    name: String,
    health_status: AtomicU16,
    health_checks: AtomicU64,
    heads: AtomicU64,
    complete: AtomicU64,
    in_flight: AtomicU64,
    body_bytes: AtomicU64,
    seen: Mutex<Vec<Seen>>,
}

/// A test backend on `127.0.0.1:0`, speaking HTTP/1.1 and h2c.
///
/// Every response carries `x-upstream: <name>`. `GET /health` answers the
/// status set with [`Upstream::set_health`] (200 at first) and is counted
/// apart from other requests. Any other request has its body read to the
/// end (counted, never kept) and is recorded as a [`Seen`]; the query then
/// shapes the answer:
///
/// - `sleep_ms=N`: wait N ms before answering;
/// - `status=N`: answer with status N;
/// - `hop=1`: add hop-by-hop headers (`Connection: x-hop-secret`,
///   `X-Hop-Secret`, `Keep-Alive`) the proxy must remove;
/// - `set=NAME:VALUE`: add that response header (`%20` for spaces).
///
/// `/big?bytes=N` streams N zero bytes; `/ws` with an `Upgrade` header
/// answers 101, writes `welcome\n` and echoes bytes; `/wsframes` answers
/// 101 and echoes WebSocket frames (client frames unmasked, sent back
/// unmasked, as a server must); `/echo` answers the request's body (its
/// first MiB) as `application/octet-stream`, with `?type=T` as its
/// content type instead; anything else answers the request it saw as JSON
/// (`method`, `target`, `version`, `headers`, `body_bytes`).
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("upstream {name}: cannot bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("upstream {name}: no local address: {e}"));
        let state = Arc::new(State {
            name: name.to_owned(),
            health_status: AtomicU16::new(200),
            ..State::default()
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Self {
            addr,
            state,
            accept,
        }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The status `/health` answers from now on.
    pub fn set_health(&self, status: u16) {
        self.state.health_status.store(status, Ordering::SeqCst);
    }

    /// Health checks received.
    pub fn health_checks(&self) -> u64 {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// Requests (health checks aside) whose head arrived.
    pub fn heads(&self) -> u64 {
        self.state.heads.load(Ordering::SeqCst)
    }

    /// Requests (health checks aside) received whole, body included.
    pub fn complete(&self) -> u64 {
        self.state.complete.load(Ordering::SeqCst)
    }

    /// Requests being handled now (until their response head is ready).
    pub fn in_flight(&self) -> u64 {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Request body bytes received over all requests.
    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    /// Every request recorded so far, in arrival order of their ends.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last request recorded.
    pub fn last(&self) -> Seen {
        self.seen()
            .pop()
            .unwrap_or_else(|| panic!("upstream {} received no request", self.name()))
    }

    /// The target with its address as the proxy configuration writes it.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(state.clone(), req));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // As many headers as the proxy may be configured to pass.
            builder.http1().max_headers(10_000);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Decrements a counter when dropped.
struct Counted<'a>(&'a AtomicU64);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A body of `bytes`, sent with its length.
pub fn body(bytes: impl Into<Bytes>) -> Body {
    full(bytes)
}

fn response(state: &State, status: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(name) = HeaderValue::from_str(&state.name) {
        response.headers_mut().insert("x-upstream", name);
    }
    response
}

async fn answer(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/health" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(state.health_status.load(Ordering::SeqCst))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(response(&state, status, full("health\n")));
    }
    state.heads.fetch_add(1, Ordering::SeqCst);
    let _busy = Counted::new(&state.in_flight);
    let query = query(&req);

    let ws_path = req.uri().path();
    if (ws_path == "/ws" || ws_path == "/wsframes") && req.headers().contains_key(header::UPGRADE) {
        let protocol = req.headers()[header::UPGRADE].clone();
        let frames = ws_path == "/wsframes";
        let upgraded = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgraded.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            if frames {
                ws_echo(&mut io).await;
                return;
            }
            if io.write_all(b"welcome\n").await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut reply = response(&state, StatusCode::SWITCHING_PROTOCOLS, empty());
        reply
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        reply.headers_mut().insert(header::UPGRADE, protocol);
        state
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Seen {
                method: req.method().to_string(),
                target: req.uri().to_string(),
                authority: req.uri().authority().map(|a| a.to_string()),
                version: req.version(),
                headers: req.headers().clone(),
                body_bytes: 0,
                complete: true,
            });
        return Ok(reply);
    }

    let (parts, mut incoming) = req.into_parts();
    let mut received = 0u64;
    let mut complete = true;
    let keep = parts.uri.path() == "/echo";
    let mut kept = Vec::new();
    while let Some(frame) = incoming.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if keep && kept.len() < 1 << 20 {
                        kept.extend_from_slice(data);
                    }
                    received += data.len() as u64;
                    state
                        .body_bytes
                        .fetch_add(data.len() as u64, Ordering::SeqCst);
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    if complete {
        state.complete.fetch_add(1, Ordering::SeqCst);
    }
    let seen = Seen {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned(),
        authority: parts.uri.authority().map(|a| a.to_string()),
        version: parts.version,
        headers: parts.headers.clone(),
        body_bytes: received,
        complete,
    };
    state
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(seen.clone());

    if let Some(ms) = query.get("sleep_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = query
        .get("status")
        .and_then(|v| v.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut reply = if keep {
        let mut r = response(&state, status, full(kept));
        let kind = query
            .get("type")
            .map(|t| t.replace("%2F", "/"))
            .unwrap_or_else(|| "application/octet-stream".to_owned());
        if let Ok(v) = HeaderValue::from_str(&kind) {
            r.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        r
    } else if parts.uri.path() == "/big" {
        let bytes = query.get("bytes").and_then(|v| v.parse().ok()).unwrap_or(0);
        response(&state, status, Zeros::sized(bytes).boxed())
    } else {
        let mut headers = serde_json::Map::new();
        for name in seen.headers.keys() {
            let values: Vec<Value> = seen
                .headers
                .get_all(name)
                .iter()
                .map(|v| Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            headers.insert(name.to_string(), Value::Array(values));
        }
        let echo = json!({
            "upstream": state.name,
            "method": seen.method,
            "target": seen.target,
            "version": format!("{:?}", seen.version),
            "headers": headers,
            "body_bytes": received,
        });
        let mut r = response(&state, status, full(echo.to_string()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    if let Some((name, value)) = query.get("set").and_then(|kv| kv.split_once(':'))
        && let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value.replace("%20", " ")),
        )
    {
        reply.headers_mut().insert(name, value);
    }
    if query.contains_key("hop") {
        let h = reply.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop-secret"));
        h.insert("x-hop-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    }
    Ok(reply)
}

/// Echoes WebSocket frames until a close frame or the end of the stream.
async fn ws_echo<I: AsyncRead + AsyncWrite + Unpin>(io: &mut I) {
    loop {
        let mut head = [0u8; 2];
        if io.read_exact(&mut head).await.is_err() {
            return;
        }
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            if io.read_exact(&mut b).await.is_err() {
                return;
            }
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            if io.read_exact(&mut b).await.is_err() {
                return;
            }
            len = u64::from_be_bytes(b);
        }
        let mut key = [0u8; 4];
        if head[1] & 0x80 != 0 && io.read_exact(&mut key).await.is_err() {
            return;
        }
        let mut payload = vec![0u8; len as usize];
        if io.read_exact(&mut payload).await.is_err() {
            return;
        }
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
        let mut out = vec![head[0]];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&payload);
        if io.write_all(&out).await.is_err() || head[0] & 0x0f == 0x8 {
            return;
        }
    }
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A body of zero bytes in 64 KiB frames, made as it is sent: any size
/// costs no memory.
pub struct Zeros {
    left: u64,
    sized: bool,
}

impl Zeros {
    /// `len` bytes, announced (Content-Length).
    pub fn sized(len: u64) -> Self {
        Self {
            left: len,
            sized: true,
        }
    }

    /// `len` bytes of unannounced length (chunked in HTTP/1.1).
    pub fn chunked(len: u64) -> Self {
        Self {
            left: len,
            sized: false,
        }
    }

    pub fn boxed(self) -> Body {
        BodyExt::boxed(self)
    }
}

impl hyper::body::Body for Zeros {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(ZEROS.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &ZEROS[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.left)
        } else {
            SizeHint::default()
        }
    }
}

/// A body made of `chunks` as they are sent, each its own frame: a large
/// body built from a few shared buffers costs no memory.
pub struct Chunks {
    chunks: Box<dyn Iterator<Item = Bytes> + Send + Sync>,
    left: u64,
}

impl Chunks {
    /// `chunks`, announced as `len` bytes (Content-Length), which must be
    /// their total.
    pub fn sized(len: u64, chunks: impl Iterator<Item = Bytes> + Send + Sync + 'static) -> Self {
        Self {
            chunks: Box::new(chunks),
            left: len,
        }
    }

    pub fn boxed(self) -> Body {
        BodyExt::boxed(self)
    }
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.chunks.next() {
            Some(chunk) => {
                self.left = self.left.saturating_sub(chunk.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// A whole response, as a client got it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Which upstream answered (`x-upstream`), or `-`.
    pub fn upstream(&self) -> &str {
        self.header("x-upstream").unwrap_or("-")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` on a new client connection over `io`, HTTP/2 when `h2`,
/// and reads the whole response.
pub async fn send_on<I>(io: I, h2: bool, req: Request<Body>) -> Result<Reply, BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    };
    let (parts, incoming) = response.into_parts();
    let body = incoming.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// A request for `path` with `headers`; for HTTP/2 the URI carries the
/// authority, for HTTP/1.1 `Host` does (`test.local` unless `headers` has
/// one).
pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
    h2: bool,
) -> Request<Body> {
    let uri = if h2 {
        format!("http://{HOST}{path}")
    } else {
        path.to_owned()
    };
    let mut builder = Request::builder().method(method).uri(uri);
    if h2 {
        builder = builder.version(Version::HTTP_2);
    } else if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        builder = builder.header(header::HOST, HOST);
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(body)
        .unwrap_or_else(|e| panic!("invalid test request {method} {path}: {e}"))
}

/// Connects to `addr`, failing the test if it cannot.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    match tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => panic!("cannot connect to {addr}: {e}"),
        Err(_) => panic!("connecting to {addr} took longer than {STEP:?}"),
    }
}

/// One HTTP/1.1 exchange on a new connection; an error when the
/// connection or the exchange fails.
pub async fn try_fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Result<Reply, BoxError> {
    let req = request(method, path, headers, body, false);
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        send_on(stream, false, req).await
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .map_err(|_| format!("{method} {path} took longer than {STEP:?}"))?
}

/// One HTTP/1.1 exchange on a new connection, failing the test if it
/// fails.
pub async fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Reply {
    try_fetch(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} via {addr} failed: {e}"))
}

/// One HTTP/1.1 exchange on a new connection whose response body is
/// counted as it arrives, never kept: the status and the body's length.
pub async fn fetch_counting(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Body,
    limit: Duration,
) -> Result<(StatusCode, u64), BoxError> {
    let req = request(method, path, &[], body, false);
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let response = sender.send_request(req).await?;
        let status = response.status();
        let mut incoming = response.into_body();
        let mut received = 0u64;
        while let Some(frame) = incoming.frame().await {
            if let Some(data) = frame?.data_ref() {
                received += data.len() as u64;
            }
        }
        Ok::<_, BoxError>((status, received))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("{method} {path} took longer than {limit:?}"))?
}

/// `GET path` over HTTP/1.1 on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    fetch(addr, "GET", path, &[], empty()).await
}

/// One HTTP/2 exchange with prior knowledge over plain TCP (h2c).
pub async fn h2c(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let req = request(method, path, headers, empty(), true);
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        send_on(stream, true, req).await
    };
    match tokio::time::timeout(STEP, exchange).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => panic!("h2c {method} {path} via {addr} failed: {e}"),
        Err(_) => panic!("h2c {method} {path} took longer than {STEP:?}"),
    }
}

/// A TLS connection to `addr` for server name `name`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(name.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let handshake = async {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(STEP, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// A port on 127.0.0.1 where connections are refused: a TCP socket bound
/// to it that never listens, held open for the life of the test process.
/// A port bound and released instead can be taken by the next socket that
/// asks for port 0 (the daemon's own metrics listener, say), and then
/// something answers where nothing should.
pub fn closed_port() -> SocketAddr {
    // SAFETY: plain socket calls on a descriptor this function owns, with
    // a sockaddr_in of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let bound = libc::bind(fd, (&raw const addr).cast(), len);
        assert!(bound == 0, "bind: {}", io::Error::last_os_error());
        let mut got = len;
        let named = libc::getsockname(fd, (&raw mut addr).cast(), &mut got);
        assert!(named == 0, "getsockname: {}", io::Error::last_os_error());
        // `fd` stays open (and unlistened) until the process exits.
        SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, u16::from_be(addr.sin_port)))
    }
}
