//! Accepting connections and driving them: connection caps, the TLS
//! handshake, HTTP/1.1 or HTTP/2, and the clocks that close idle and slow
//! connections.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, watch},
};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{
    ListenerSpec, Shared,
    framing::{Framing, Verdict},
    handler,
};

/// How many header fields hyper accepts in an HTTP/1 head when told no
/// other number (`DEFAULT_MAX_HEADERS` in hyper's `proto::h1::role`).
const HYPER_MAX_HEADERS: usize = 100;

/// Who is on the other end of a connection, for the request handler.
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    /// `http` or `https`, as X-Forwarded-Proto says it.
    pub scheme: &'static str,
    /// The listener's `request-timeout-secs`; zero: none.
    pub request_timeout: Duration,
}

/// Accepts on `socket` until `stop` turns true.
pub async fn accept_loop(
    name: String,
    socket: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    let name: Arc<str> = Arc::from(name);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of descriptors or memory: back off instead of
                    // spinning on the error.
                    warn!(listener = %name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(global) = shared.connections.clone().try_acquire_owned() else {
            debug!(listener = %name, %peer, "system.max-connections reached; connection closed");
            continue;
        };
        let spec = shared.snapshot.load().listeners.get(&*name).cloned();
        let Some(spec) = spec else {
            // Removed by a reload that has not stopped this loop yet.
            break;
        };
        let local = match &spec.connections {
            None => None,
            Some(cap) => match cap.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    debug!(listener = %name, %peer, "listener max-connections reached; connection closed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let info = Arc::new(ConnInfo {
            listener: name.clone(),
            peer,
            scheme: if spec.tls.is_some() { "https" } else { "http" },
            request_timeout: spec.config.request_timeout,
        });
        tracker.spawn(serve(stream, info, spec, shared.clone(), (global, local)));
    }
}

type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

async fn serve(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    spec: Arc<ListenerSpec>,
    shared: Arc<Shared>,
    permits: Permits,
) {
    let gauge = shared
        .metrics
        .active_connections
        .with_label_values(&[&*info.listener]);
    gauge.inc();
    // The connection counts (gauge and caps) for as long as its activity
    // lives, which an upgraded connection's tunnel extends past hyper.
    let activity = Arc::new(Activity::new(Counted {
        _permits: permits,
        gauge,
    }));
    let (max_head, max_headers) = {
        let limits = &shared.snapshot.load().limits;
        (limits.max_header_bytes, limits.max_header_count)
    };
    match &spec.tls {
        None => {
            let io = Watched::new(stream, activity.clone(), max_head, max_headers);
            drive(io, false, info, &spec, shared, activity).await
        }
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(spec.config.header_read_timeout, acceptor.accept(stream))
                    .await;
            match handshake {
                Ok(Ok(tls)) => {
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    if h2 {
                        activity.multiplexed.store(true, Ordering::Relaxed);
                    }
                    let io = Watched::new(tls, activity.clone(), max_head, max_headers);
                    drive(io, h2, info, &spec, shared, activity).await;
                }
                Ok(Err(error)) => debug!(peer = %info.peer, %error, "TLS handshake failed"),
                Err(_) => debug!(peer = %info.peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn drive<I>(
    io: I,
    h2_only: bool,
    info: Arc<ConnInfo>,
    spec: &ListenerSpec,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.snapshot.load().limits.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Our own clocks below tell an idle keep-alive connection from a
        // slow request head; hyper's would count idle time as head time.
        .header_read_timeout(None)
        // hyper answers 431 when a head does not fit its buffer; it cannot
        // be smaller than 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    // Without a count of its own hyper holds heads to the same 100 fields
    // on stack arrays it leaves uninitialised; with one it fills two
    // vectors of that many entries for every request head it parses
    // (about 1,700 instructions a request, measured with callgrind).
    if limits.max_header_count != HYPER_MAX_HEADERS {
        builder.http1().max_headers(limits.max_header_count);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = if h2_only {
        builder.http2_only()
    } else {
        builder
    };

    let mut draining = shared.draining.clone();
    let service = {
        let activity = activity.clone();
        service_fn(move |req| handler::handle(req, info.clone(), shared.clone(), activity.clone()))
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);

    let header_read = spec.config.header_read_timeout;
    let keepalive = spec.config.keepalive_timeout;
    // One timer per connection, set to the next moment a clock could
    // expire; a request head starting wakes the loop to arm its clock.
    let wake = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(wake);
    let mut closing = false;
    if *draining.borrow() {
        conn.as_mut().graceful_shutdown();
        closing = true;
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    debug!(%error, "connection ended with an error");
                }
                break;
            }
            _ = draining.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = activity.head_started_signal.notified() => {
                let (_, next) = activity.clock(header_read, keepalive);
                wake.as_mut().reset(tokio::time::Instant::now() + next);
            }
            _ = wake.as_mut() => {
                let (clock, next) = activity.clock(header_read, keepalive);
                match clock {
                    Clock::Keep => {}
                    Clock::CloseIdle => if !closing {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    },
                    Clock::Abort => {
                        debug!("request head not received in time; connection dropped");
                        break;
                    }
                }
                wake.as_mut().reset(tokio::time::Instant::now() + next);
            }
        }
    }
}

/// What the connection's clocks decide.
enum Clock {
    Keep,
    /// Idle past the keep-alive timeout: close between requests.
    CloseIdle,
    /// A request head started arriving and did not finish in time.
    Abort,
}

/// A connection's activity, shared by its IO, its requests and its clocks.
pub struct Activity {
    _counted: Counted,
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` when the last request finished.
    idle_since: AtomicU64,
    /// Milliseconds since `epoch`, plus one, when the first byte of the next
    /// request arrived; 0 while nothing arrived.
    head_started: AtomicU64,
    /// HTTP/2: bytes between requests are pings and window updates, not a
    /// request head.
    multiplexed: AtomicBool,
    /// Framing verdicts of HTTP/1 request heads not yet handled, in order.
    verdicts: Mutex<VecDeque<Verdict>>,
    head_started_signal: Notify,
}

impl Activity {
    fn new(counted: Counted) -> Self {
        Self {
            _counted: counted,
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            multiplexed: AtomicBool::new(false),
            verdicts: Mutex::new(VecDeque::new()),
            head_started_signal: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && !self.multiplexed.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started
                .store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// A request is being handled until the guard drops (after its
    /// response body is written).
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    /// The framing verdict of the request the handler is about to serve.
    pub fn framing_verdict(&self) -> Verdict {
        self.verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(Verdict::Clean)
    }

    /// What the clocks say now, and when to ask them again.
    fn clock(&self, header_read: Duration, keepalive: Duration) -> (Clock, Duration) {
        let (head_ms, idle_ms) = (header_read.as_millis() as u64, keepalive.as_millis() as u64);
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            // A request in flight has its own deadlines; look again later
            // for the idle clock that starts when it ends.
            return (Clock::Keep, header_read.min(keepalive));
        }
        let now = self.now_ms();
        let started = self.head_started.load(Ordering::Relaxed);
        if started != 0 {
            let elapsed = now.saturating_sub(started - 1);
            if elapsed > head_ms {
                return (Clock::Abort, Duration::ZERO);
            }
            return (Clock::Keep, Duration::from_millis(head_ms - elapsed + 1));
        }
        let idle = now.saturating_sub(self.idle_since.load(Ordering::Relaxed));
        if idle > idle_ms {
            return (Clock::CloseIdle, header_read.min(keepalive));
        }
        (Clock::Keep, Duration::from_millis(idle_ms - idle + 1))
    }
}

/// A connection's place under the caps and in
/// `sentinel_active_connections`, given back on drop.
struct Counted {
    _permits: Permits,
    gauge: prometheus::IntGauge,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            a.idle_since.store(a.now_ms(), Ordering::Relaxed);
        }
    }
}

/// The client connection (after TLS), noting when bytes arrive and
/// following HTTP/1 framing.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
    framing: Option<Framing>,
}

impl<I> Watched<I> {
    fn new(inner: I, activity: Arc<Activity>, max_head: usize, max_headers: usize) -> Self {
        let framing = (!activity.multiplexed.load(Ordering::Relaxed))
            .then(|| Framing::new(max_head, max_headers));
        Self {
            inner,
            activity,
            framing,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let this = &mut *self;
            this.activity.on_read();
            if let Some(framing) = &mut this.framing {
                framing.feed(&buf.filled()[before..]);
                if !framing.verdicts.is_empty() {
                    this.activity
                        .verdicts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(framing.verdicts.drain(..));
                }
                if framing.lost() {
                    this.framing = None;
                }
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
