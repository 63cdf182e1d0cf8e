//! Accepting connections and driving them: connection caps, the TLS
//! handshake, HTTP/1.1 or HTTP/2, and the clocks that close idle and slow
//! connections.

use std::{
    collections::VecDeque,
    io,
    net::{SocketAddr, TcpStream as StdTcpStream},
    os::fd::{AsRawFd, BorrowedFd, RawFd},
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
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf, unix::AsyncFd},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, watch},
};
use tokio_rustls::server::TlsStream;
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
#[derive(Clone)]
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

/// What the framing tracker needs from the limits, read once per
/// connection.
#[derive(Clone, Copy)]
struct HeadLimits {
    max_head: usize,
    max_headers: usize,
}

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
    let limits = {
        let limits = &shared.snapshot.load().limits;
        HeadLimits {
            max_head: limits.max_header_bytes,
            max_headers: limits.max_header_count,
        }
    };
    if spec.tls.is_none() {
        serve_plain(stream, info, spec, shared, activity, limits, Proto::Detect).await;
    } else {
        // Boxed: the handshake and a TLS session are large futures, which
        // would otherwise size every connection's task, idle plain ones
        // included.
        let tls = Box::pin(serve_tls(stream, info, spec, shared, activity, limits));
        tls.await;
    }
}

async fn serve_tls(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    spec: Arc<ListenerSpec>,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    limits: HeadLimits,
) {
    let Some(acceptor) = &spec.tls else { return };
    let handshake =
        tokio::time::timeout(spec.config.header_read_timeout, acceptor.accept(stream)).await;
    match handshake {
        Ok(Ok(tls)) => {
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                activity.multiplexed.store(true, Ordering::Relaxed);
                let io = Watched::new(tls, activity.clone(), limits, None);
                drive(
                    io,
                    None,
                    Proto::Http2,
                    &info,
                    &spec,
                    &shared,
                    &activity,
                    limits,
                )
                .await;
                return;
            }
            serve_tls_http1(tls, &info, &spec, &shared, &activity, limits).await;
        }
        Ok(Err(error)) => debug!(peer = %info.peer, %error, "TLS handshake failed"),
        Err(_) => debug!(peer = %info.peer, "TLS handshake timed out"),
    }
}

/// An HTTP/1 connection over TLS, session by session: it parks as a plain
/// one does (hyper's session and buffers freed), but in its own task, with
/// its TLS session: the socket waits for readability here, and its next
/// bytes start a new hyper session.
async fn serve_tls_http1(
    tls: TlsStream<TcpStream>,
    info: &Arc<ConnInfo>,
    spec: &ListenerSpec,
    shared: &Arc<Shared>,
    activity: &Arc<Activity>,
    limits: HeadLimits,
) {
    let home = Home::new();
    let mut draining = shared.draining.clone();
    let mut proto = Proto::Detect;
    let mut next = Some(tls);
    while let Some(tls) = next.take() {
        activity.may_park.store(false, Ordering::Relaxed);
        let io = Watched::new(tls, activity.clone(), limits, Some(home.clone()));
        // Boxed: the session exists only while requests come.
        Box::pin(drive(io, None, proto, info, spec, shared, activity, limits)).await;
        if activity.heads.load(Ordering::Relaxed) > 0 {
            proto = Proto::Http1;
        }
        // Parked, the stream is back home; otherwise hyper closed it.
        let Some(stream) = home.take() else { return };
        let mut tls = stream.inner;
        if !wait_readable(&tls, activity, spec.config.keepalive_timeout, &mut draining).await {
            // Closed as hyper closes one: close_notify, then FIN.
            let _ = tokio::time::timeout(CLOSE_NOTIFY, tls.shutdown()).await;
            return;
        }
        next = Some(tls);
    }
}

/// How long closing a parked TLS connection waits to write its
/// close_notify.
const CLOSE_NOTIFY: Duration = Duration::from_secs(1);

/// Waits, without buffers, for a parked TLS connection's next bytes;
/// `false` when it is to close instead: idle past the keep-alive timeout,
/// the daemon draining, or a socket error.
async fn wait_readable(
    tls: &TlsStream<TcpStream>,
    activity: &Activity,
    keepalive: Duration,
    draining: &mut watch::Receiver<bool>,
) -> bool {
    if *draining.borrow() {
        return false;
    }
    let mut drained = std::pin::pin!(draining.changed());
    let mut expired = std::pin::pin!(tokio::time::sleep_until(activity.idle_deadline(keepalive)));
    // The TLS session holds no plaintext and no whole record: the parked
    // read found none and the socket empty. What comes next arrives on
    // the socket.
    std::future::poll_fn(|cx| {
        if drained.as_mut().poll(cx).is_ready() || expired.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        tls.get_ref()
            .0
            .poll_read_ready(cx)
            .map(|ready| ready.is_ok())
    })
    .await
}

/// A plain connection's session: hyper serves requests while they come;
/// when it waits for the next head and none has arrived, the connection
/// parks (see [`Watched`]): hyper's connection and its buffers are freed,
/// this task ends, and the socket waits in the daemon's set of idle
/// connections (see [`super::idle`]) with a [`Parked`] copy of what it
/// takes to serve it again, as an idle keep-alive connection waits in
/// nginx: without a buffer, a task or a timer of its own. Its next bytes
/// start a new session on a new task ([`resume`]).
async fn serve_plain(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    spec: Arc<ListenerSpec>,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    limits: HeadLimits,
    proto: Proto,
) {
    // A new session parks only once its own park clock says so (a resumed
    // one starts with the socket's readiness not yet known to tokio).
    activity.may_park.store(false, Ordering::Relaxed);
    let home = Home::new();
    let fd = stream.as_raw_fd();
    let io = Watched::new(stream, activity.clone(), limits, Some(home.clone()));
    // Boxed: a session (hyper's connection state, builders, clocks) is
    // large, and lives only while requests come.
    let session = Box::pin(drive(
        io,
        Some(fd),
        proto,
        &info,
        &spec,
        &shared,
        &activity,
        limits,
    ));
    session.await;
    // hyper has let go of the connection: parked, it is back home;
    // otherwise it is closed.
    let Some(stream) = home.take() else { return };
    if *shared.draining.borrow() {
        return;
    }
    let socket = match stream.inner.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            debug!(peer = %info.peer, %error, "cannot park the connection; closed");
            return;
        }
    };
    let deadline = activity.idle_deadline(spec.config.keepalive_timeout);
    // A connection that parked before its first request has not said yet
    // whether it speaks HTTP/2.
    let served = matches!(proto, Proto::Http1) || activity.heads.load(Ordering::Relaxed) > 0;
    let activity = match Arc::try_unwrap(activity) {
        Ok(activity) => Kept::Counts {
            counted: activity._counted,
            served,
        },
        Err(shared) => Kept::Shared {
            activity: shared,
            served,
        },
    };
    let parked = Parked {
        _idle: IdleCount::new(
            shared
                .metrics
                .idle_connections
                .with_label_values(&[&*info.listener]),
        ),
        info: ConnInfo::clone(&info),
        spec,
        activity,
        limits,
    };
    drop(info);
    if let Err(error) = shared.idle.park(socket, deadline, parked) {
        debug!(%error, "cannot park the connection; closed");
    }
}

/// What a parked connection needs to be served again, held by value in
/// its slot of the idle set: about 180 bytes in all.
pub(super) struct Parked {
    _idle: IdleCount,
    info: ConnInfo,
    spec: Arc<ListenerSpec>,
    activity: Kept,
    limits: HeadLimits,
}

/// A parked connection's place in `sentinel_idle_connections`, given back
/// when it resumes or closes.
struct IdleCount(prometheus::IntGauge);

impl IdleCount {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for IdleCount {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A parked connection's [`Activity`]: between requests nothing of it
/// matters but its place under the caps and whether it has served a
/// request (it speaks HTTP/1).
enum Kept {
    /// The usual case: the activity was the session's alone.
    Counts { counted: Counted, served: bool },
    /// Something that outlived the session still holds it.
    Shared {
        activity: Arc<Activity>,
        served: bool,
    },
}

/// Serves the daemon's idle connections (see [`super::idle`]) until it
/// drains: each one whose client sends again gets a task and a session.
pub(super) async fn watch_idle(shared: Arc<Shared>, tracker: TaskTracker) {
    let draining = shared.draining.clone();
    shared
        .idle
        .watch(draining, |socket, parked| {
            resume(socket, parked, &shared, &tracker)
        })
        .await;
}

fn resume(
    socket: std::net::TcpStream,
    parked: Parked,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
) {
    let stream = match TcpStream::from_std(socket) {
        Ok(stream) => stream,
        Err(error) => {
            debug!(peer = %parked.info.peer, %error, "cannot resume a parked connection; closed");
            return;
        }
    };
    let Parked {
        info,
        spec,
        activity,
        limits,
        ..
    } = parked;
    let (activity, served) = match activity {
        Kept::Counts { counted, served } => (Arc::new(Activity::new(counted)), served),
        Kept::Shared { activity, served } => (activity, served),
    };
    let proto = if served { Proto::Http1 } else { Proto::Detect };
    tracker.spawn(serve_plain(
        stream,
        Arc::new(info),
        spec,
        shared.clone(),
        activity,
        limits,
        proto,
    ));
}

/// How hyper serves a session.
#[derive(Clone, Copy)]
enum Proto {
    /// HTTP/1.1, or HTTP/2 when the connection starts with its preface.
    Detect,
    /// HTTP/2 only (TLS with ALPN h2).
    Http2,
    /// HTTP/1.1: a plain connection's later sessions.
    Http1,
}

/// One hyper session on `io`, until it ends: the client closed, a clock
/// closed it, the daemon is draining, or the connection parked.
#[allow(clippy::too_many_arguments)]
async fn drive<I>(
    io: Watched<I>,
    client_fd: Option<RawFd>,
    proto: Proto,
    info: &Arc<ConnInfo>,
    spec: &ListenerSpec,
    shared: &Arc<Shared>,
    activity: &Arc<Activity>,
    limits: HeadLimits,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let (info, shared, activity) = (info.clone(), shared.clone(), activity.clone());
        service_fn(move |req| handler::handle(req, info.clone(), shared.clone(), activity.clone()))
    };
    let clocks = Clocks {
        header_read: spec.config.header_read_timeout,
        keepalive: spec.config.keepalive_timeout,
        parks: io.home.is_some(),
        client_fd,
    };
    let io = TokioIo::new(io);

    match proto {
        Proto::Http1 => {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new());
            // Our own clocks below tell an idle keep-alive connection from
            // a slow request head; hyper's would count idle time as head
            // time.
            builder.header_read_timeout(None);
            // See `ClientGone`: hyper does not read between a request's head
            // and its response; the session watches the socket instead.
            builder.half_close(client_fd.is_some());
            // hyper answers 431 when a head does not fit its buffer; it
            // cannot be smaller than 8 KiB.
            builder.max_buf_size(limits.max_head.max(8192));
            if limits.max_headers != HYPER_MAX_HEADERS {
                builder.max_headers(limits.max_headers);
            }
            let conn = builder.serve_connection(io, service).with_upgrades();
            run(conn, |c| c.graceful_shutdown(), clocks, shared, activity).await;
        }
        Proto::Detect | Proto::Http2 => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .half_close(client_fd.is_some())
                .max_buf_size(limits.max_head.max(8192));
            // Without a count of its own hyper holds heads to the same 100
            // fields on stack arrays it leaves uninitialised; with one it
            // fills two vectors of that many entries for every request head
            // it parses (about 1,700 instructions a request, measured with
            // callgrind).
            if limits.max_headers != HYPER_MAX_HEADERS {
                builder.http1().max_headers(limits.max_headers);
            }
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(limits.max_head).unwrap_or(u32::MAX));
            let builder = match proto {
                Proto::Http2 => builder.http2_only(),
                _ => builder,
            };
            let conn = builder.serve_connection_with_upgrades(io, service);
            run(conn, |c| c.graceful_shutdown(), clocks, shared, activity).await;
        }
    }
}

#[derive(Clone, Copy)]
struct Clocks {
    header_read: Duration,
    keepalive: Duration,
    /// Whether the connection can park (a plain one).
    parks: bool,
    /// The client's socket, watched for the client going away while a
    /// request is handled (see [`ClientGone`]); `None` where hyper watches
    /// it itself (TLS).
    client_fd: Option<RawFd>,
}

/// How long a plain HTTP/1 connection stays idle, its last response
/// written and nothing more received, before it parks and gives back
/// hyper's buffers (see [`Watched`]). Parking and starting a new session
/// cost about 15,000 instructions (callgrind), as much as a third of a
/// proxied request: a client that sends its next request within this
/// time (any busy keep-alive client, the benchmark's included) never
/// pays it, and an idle connection holds its 20 KiB and more of buffers
/// for no longer than this.
const PARK_AFTER: Duration = Duration::from_millis(20);

/// How long a request on a plain connection is handled before its session
/// watches the client's socket for the client leaving (see [`ClientGone`]):
/// most requests are answered sooner and never pay for the watch.
const WATCH_AFTER: Duration = Duration::from_millis(50);

/// Watches a plain connection's socket for the client going away while a
/// request is handled.
///
/// hyper, by default, reads between a request's head and its response to
/// notice a client that closed, and to have a buffer to read into it gives
/// up its read buffer, shared with the request's header values, for a new
/// 8 KiB one on every request (one allocation and one free a request,
/// about 1,400 instructions with the rest of that read, measured with
/// callgrind). With `half_close` it does not read then; this watch, on a
/// duplicate of the socket registered for readiness alone, notices the
/// end of the client's stream instead, for requests that take long enough
/// for it to matter.
struct ClientGone {
    /// A duplicate of the client's socket, as a std socket for `peek`.
    socket: AsyncFd<StdTcpStream>,
}

impl ClientGone {
    /// Watches a duplicate of `fd`, the session's socket.
    fn new(fd: RawFd) -> io::Result<Self> {
        // SAFETY: `fd` is the session's socket, held open by hyper's
        // connection, which `run` is still polling; the borrow lasts only
        // while it is duplicated.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) };
        let duplicate = StdTcpStream::from(socket.try_clone_to_owned()?);
        // SAFETY: the duplicate is owned by the `AsyncFd` and stays open as
        // long as it does.
        let socket = unsafe { AsyncFd::register_with_interest(duplicate, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { socket })
    }

    /// Ready once the client's stream has ended with nothing unread (its
    /// FIN, or a reset), as hyper's own read would have found it. Bytes it
    /// sent meanwhile are left for hyper.
    fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut guard = match self.socket.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(guard)) => guard,
            };
            // The socket is non-blocking (the flag belongs to the file
            // description both descriptors share).
            match guard.get_inner().peek(&mut [0u8; 1]) {
                Ok(0) => return Poll::Ready(()),
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(()),
                // Bytes, or nothing after all: wait for the next change.
                _ => guard.clear_ready(),
            }
        }
    }
}

/// Polls `conn` to its end under the connection's clocks and the drain;
/// `finish` asks it to finish its current request and close.
async fn run<C, E>(
    conn: C,
    finish: impl Fn(Pin<&mut C>),
    clocks: Clocks,
    shared: &Shared,
    activity: &Activity,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let mut draining = shared.draining.clone();
    let mut closing = false;
    if *draining.borrow_and_update() {
        finish(conn.as_mut());
        closing = true;
    }
    // Kept across polls, so that waiting for the drain registers once per
    // session rather than on every wake-up of the connection.
    let mut drained = std::pin::pin!(draining.changed());
    // One timer per connection, set to the next moment a clock could
    // expire: the head, keep-alive or park clock.
    let (_, next) = activity.clock(clocks.header_read, clocks.keepalive);
    let mut wake = std::pin::pin!(tokio::time::sleep(next));
    // When this connection may park, if it stays idle until then.
    let mut park_at =
        (clocks.parks && activity.nothing_owed()).then(|| tokio::time::Instant::now() + PARK_AFTER);
    // When to start watching the socket for the client leaving, once a
    // request has been in flight this long; the watcher, once started.
    let mut watch_at: Option<tokio::time::Instant> = None;
    let mut gone: Option<ClientGone> = None;
    // The socket to watch; given up for the session if it cannot be.
    let mut watching = clocks.client_fd;
    std::future::poll_fn(|cx| {
        loop {
            if !closing && drained.as_mut().poll(cx).is_ready() {
                finish(conn.as_mut());
                closing = true;
            }
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                if let Err(error) = result {
                    debug!(%error, "connection ended with an error");
                }
                return Poll::Ready(());
            }
            if let Some(fd) = watching
                && !activity.multiplexed.load(Ordering::Relaxed)
            {
                if activity.in_flight.load(Ordering::Relaxed) == 0 {
                    watch_at = None;
                } else if let Some(watcher) = &gone {
                    if watcher.poll_gone(cx).is_ready() {
                        // What hyper did when it read the end mid-request:
                        // the request's handling is dropped with the
                        // connection, its upstream exchange with it.
                        debug!("the client closed its connection mid-request");
                        return Poll::Ready(());
                    }
                } else {
                    let now = tokio::time::Instant::now();
                    match watch_at {
                        None => {
                            let at = now + WATCH_AFTER;
                            watch_at = Some(at);
                            if at < wake.deadline() {
                                wake.as_mut().reset(at);
                            }
                        }
                        Some(at) if now >= at => {
                            match ClientGone::new(fd) {
                                // Polled from the top, which registers it.
                                Ok(watcher) => {
                                    gone = Some(watcher);
                                    continue;
                                }
                                // Out of descriptors, say: a client that
                                // leaves is noticed when its response is
                                // written.
                                Err(error) => {
                                    debug!(%error, "cannot watch the client's socket");
                                    watching = None;
                                }
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
            // Reads and writes happened in the poll above, on this task:
            // the flags they left re-arm the timer. Moving it earlier
            // re-registers it with the driver; moving it later is an
            // atomic update, and a timer left earlier than needed only
            // wakes this loop to look again.
            if activity.head_started_signal.swap(false, Ordering::Relaxed) {
                // The first byte of a request head: its clock starts now.
                let (_, next) = activity.clock(clocks.header_read, clocks.keepalive);
                let at = tokio::time::Instant::now() + next;
                if at < wake.deadline() {
                    wake.as_mut().reset(at);
                }
            }
            if activity.went_idle.swap(false, Ordering::Relaxed) {
                // Nothing owed and no head started: the park and
                // keep-alive clocks are the only ones running.
                let at = (tokio::time::Instant::now() + PARK_AFTER)
                    .min(activity.idle_deadline(clocks.keepalive));
                park_at = Some(at);
                wake.as_mut().reset(at);
            }
            if wake.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = tokio::time::Instant::now();
            if park_at.is_some_and(|at| now >= at) {
                park_at = None;
                // Idle all along: hyper, polled again below, asks for the
                // next head and is told the client closed (see `Watched`).
                if activity.nothing_owed() {
                    activity.may_park.store(true, Ordering::Relaxed);
                }
            }
            let (clock, next) = activity.clock(clocks.header_read, clocks.keepalive);
            let at = park_at.map_or(now + next, |at| at.min(now + next));
            wake.as_mut().reset(at);
            match clock {
                Clock::Keep => {}
                Clock::CloseIdle => {
                    if !closing {
                        finish(conn.as_mut());
                        closing = true;
                    }
                }
                Clock::Abort => {
                    debug!("request head not received in time; connection dropped");
                    return Poll::Ready(());
                }
            }
            // Poll again: the timer is re-armed, and a connection told to
            // finish or to park may be done at once.
        }
    })
    .await
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
    /// Set when `head_started` is: the connection's clock re-arms for the
    /// head deadline. Reads happen on the connection's own task, inside
    /// its poll of hyper, so a flag it looks at after that poll suffices.
    head_started_signal: AtomicBool,
    /// HTTP/1 request heads the framing tracker found.
    heads: AtomicU64,
    /// Requests whose handling ended (response written, or given up).
    completed: AtomicU64,
    /// A plain connection's last response owed was flushed: its park
    /// clock starts.
    went_idle: AtomicBool,
    /// The park clock expired with nothing owed: the next read that finds
    /// no bytes parks the connection. Bytes arriving clear it.
    may_park: AtomicBool,
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
            head_started_signal: AtomicBool::new(false),
            heads: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            went_idle: AtomicBool::new(false),
            may_park: AtomicBool::new(false),
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
            self.head_started_signal.store(true, Ordering::Relaxed);
        }
    }

    /// Whether every request head found has been handled to its end.
    fn nothing_owed(&self) -> bool {
        self.completed.load(Ordering::Relaxed) == self.heads.load(Ordering::Relaxed)
    }

    /// When an idle connection's keep-alive clock expires (the moment
    /// [`Activity::clock`] would say `CloseIdle`).
    fn idle_deadline(&self, keepalive: Duration) -> tokio::time::Instant {
        let idle_since = self.idle_since.load(Ordering::Relaxed);
        let at = self.epoch + Duration::from_millis(idle_since + 1) + keepalive;
        tokio::time::Instant::from_std(at)
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
        a.completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The client's byte stream (after TLS) and what follows it: the framing
/// tracker, whether written bytes are still unflushed.
struct Stream<I> {
    inner: I,
    framing: Option<Framing>,
    dirty: bool,
}

impl<I> Stream<I> {
    fn new(inner: I, limits: HeadLimits) -> Self {
        Self {
            inner,
            framing: Some(Framing::new(limits.max_head, limits.max_headers)),
            dirty: false,
        }
    }

    /// Whether hyper, asking for bytes now, can only be waiting for the
    /// next request head with an empty buffer: every byte read belongs
    /// to a complete request (the framing tracker is between messages,
    /// not after an upgrade request), every request found has been
    /// handled to its end, and everything written has been flushed.
    /// hyper returns to reading heads only after a flush that finds both
    /// its request and its response finished, so none of its state is
    /// lost when it is told the client closed.
    fn idle(&self, activity: &Activity) -> bool {
        self.framing.as_ref().is_some_and(Framing::between_messages)
            && !self.dirty
            && activity.nothing_owed()
    }
}

/// Where a parked connection's stream goes when hyper drops it.
struct Home<I>(Arc<Mutex<Option<Stream<I>>>>);

impl<I> Clone for Home<I> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<I> Home<I> {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }

    fn put(&self, stream: Stream<I>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
    }

    fn take(&self) -> Option<Stream<I>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The client connection as hyper sees it: notes when bytes arrive,
/// follows HTTP/1 framing, and parks.
///
/// Parking: on an HTTP/1 connection with a [`Home`] (plain or TLS), when hyper asks
/// for bytes while the stream is [idle](Stream::idle) and the socket has
/// none, hyper is told the client closed. It then ends the session as it
/// does for a client that closes between requests: without a response
/// and without shutting the socket down (`poll_shutdown` is not passed
/// on), and drops this wrapper, which hands the stream back home. The
/// socket was never closed; the client sees a keep-alive connection.
struct Watched<I> {
    /// `None` only once handed back home.
    stream: Option<Stream<I>>,
    activity: Arc<Activity>,
    home: Option<Home<I>>,
    parked: bool,
}

impl<I> Watched<I> {
    fn new(inner: I, activity: Arc<Activity>, limits: HeadLimits, home: Option<Home<I>>) -> Self {
        let mut stream = Stream::new(inner, limits);
        if activity.multiplexed.load(Ordering::Relaxed) {
            stream.framing = None;
        }
        Self {
            stream: Some(stream),
            activity,
            home,
            parked: false,
        }
    }
}

impl<I> Drop for Watched<I> {
    fn drop(&mut self) {
        if self.parked
            && let (Some(home), Some(stream)) = (&self.home, self.stream.take())
        {
            // The verdict queue is empty between messages; a parked
            // connection gives back its memory too.
            self.activity
                .verdicts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shrink_to_fit();
            home.put(stream);
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection parked")
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.parked {
            // The end of this session's stream, whatever arrives next.
            return Poll::Ready(Ok(()));
        }
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let parkable = this.home.is_some()
            && this.activity.may_park.load(Ordering::Relaxed)
            && stream.idle(&this.activity);
        let before = buf.filled().len();
        let polled = Pin::new(&mut stream.inner).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.activity.on_read();
                this.activity.may_park.store(false, Ordering::Relaxed);
                if let Some(framing) = &mut stream.framing {
                    framing.feed(&buf.filled()[before..]);
                    if !framing.verdicts.is_empty() {
                        this.activity
                            .heads
                            .fetch_add(framing.verdicts.len() as u64, Ordering::Relaxed);
                        this.activity
                            .verdicts
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend(framing.verdicts.drain(..));
                    }
                    if framing.lost() {
                        stream.framing = None;
                    }
                }
            }
            Poll::Pending if parkable => {
                this.parked = true;
                return Poll::Ready(Ok(()));
            }
            _ => {}
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> Watched<I> {
    fn inner(&mut self) -> io::Result<&mut Stream<I>> {
        self.stream.as_mut().ok_or_else(gone)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let stream = self.inner()?;
        let polled = Pin::new(&mut stream.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            stream.dirty = true;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let polled = Pin::new(&mut stream.inner).poll_flush(cx);
        if matches!(polled, Poll::Ready(Ok(()))) && std::mem::take(&mut stream.dirty) {
            // The end of a response went out: if it was the last one owed,
            // the connection may park.
            if this.home.is_some() && stream.idle(&this.activity) {
                this.activity.went_idle.store(true, Ordering::Relaxed);
            }
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.parked {
            // Not closed: it goes home.
            return Poll::Ready(Ok(()));
        }
        let stream = self.inner()?;
        Pin::new(&mut stream.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let stream = self.inner()?;
        let polled = Pin::new(&mut stream.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            stream.dirty = true;
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(|s| s.inner.is_write_vectored())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, DuplexStream, duplex};
    use tokio::sync::Semaphore;

    fn activity() -> Arc<Activity> {
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a permit");
        let gauge = prometheus::IntGauge::new("test_gauge", "test").expect("gauge");
        Arc::new(Activity::new(Counted {
            _permits: (permit, None),
            gauge,
        }))
    }

    fn watched(
        activity: &Arc<Activity>,
    ) -> (Watched<DuplexStream>, DuplexStream, Home<DuplexStream>) {
        let (ours, client) = duplex(4096);
        let home = Home::new();
        let limits = HeadLimits {
            max_head: 8192,
            max_headers: 100,
        };
        let io = Watched::new(ours, activity.clone(), limits, Some(home.clone()));
        (io, client, home)
    }

    /// One read as hyper does it: `None` while pending, else the bytes.
    fn read(io: &mut Watched<DuplexStream>) -> Option<Vec<u8>> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut space = [0u8; 1024];
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(io).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) => Some(buf.filled().to_vec()),
            Poll::Ready(Err(e)) => panic!("read failed: {e}"),
            Poll::Pending => None,
        }
    }

    fn write(io: &mut Watched<DuplexStream>, bytes: &[u8]) {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = Pin::new(io);
        assert!(
            matches!(io.as_mut().poll_write(&mut cx, bytes), Poll::Ready(Ok(n)) if n == bytes.len())
        );
        assert!(matches!(
            io.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
    }

    #[tokio::test]
    async fn parks_only_between_requests_and_keeps_the_socket() {
        let activity = activity();
        let (mut io, mut client, home) = watched(&activity);
        activity.may_park.store(true, Ordering::Relaxed);

        // A request arrives: delivered, and bytes clear the permission.
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("client writes");
        let got = read(&mut io).expect("the request");
        assert!(got.starts_with(b"GET / "));
        assert_eq!(activity.heads.load(Ordering::Relaxed), 1);
        activity.may_park.store(true, Ordering::Relaxed);
        // A request owed: no parking, the read is simply pending.
        assert_eq!(read(&mut io), None);
        assert!(!io.parked);

        // Answered and flushed: the connection went idle, not before.
        let guard = activity.begin();
        write(&mut io, b"HTTP/1.1 200 OK\r\n");
        assert!(
            !activity.went_idle.load(Ordering::Relaxed),
            "a request is still owed"
        );
        drop(guard);
        write(&mut io, b"content-length: 0\r\n\r\n");
        assert!(activity.went_idle.swap(false, Ordering::Relaxed));
        let mut reply = [0u8; 64];
        let n = client.read(&mut reply).await.expect("client reads");
        assert!(reply[..n].starts_with(b"HTTP/1.1 200"));

        // Half a head: not between messages, no parking.
        client
            .write_all(b"GET /next HT")
            .await
            .expect("client writes");
        let got = read(&mut io).expect("half a head");
        assert_eq!(got, b"GET /next HT");
        activity.may_park.store(true, Ordering::Relaxed);
        assert_eq!(read(&mut io), None);
        assert!(!io.parked);
        client
            .write_all(b"TP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("client writes");
        assert!(read(&mut io).is_some());
        drop(activity.begin());

        // Idle and allowed: hyper is told the client closed, the socket is
        // not shut down, and the stream goes home when hyper drops it.
        activity.may_park.store(true, Ordering::Relaxed);
        assert_eq!(
            read(&mut io),
            Some(Vec::new()),
            "an end of stream for hyper"
        );
        assert!(io.parked);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(
            Pin::new(&mut io).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        drop(io);
        let mut stream = home.take().expect("the stream is home");
        client
            .write_all(b"after")
            .await
            .expect("the client's side is open");
        let mut after = [0u8; 5];
        stream
            .inner
            .read_exact(&mut after)
            .await
            .expect("the stream reads on");
        assert_eq!(&after, b"after");
    }

    #[tokio::test]
    async fn a_closed_connection_does_not_go_home() {
        let activity = activity();
        let (io, _client, home) = watched(&activity);
        drop(io);
        assert!(home.take().is_none());
    }
}

#[cfg(test)]
mod parked_size {
    use super::*;

    /// What an idle connection costs the daemon is mostly this; nginx
    /// keeps about 480 bytes for one (its connection, two events and a
    /// 256-byte pool).
    #[test]
    fn a_parked_connection_is_held_in_under_200_bytes() {
        let size = std::mem::size_of::<Parked>();
        assert!(size <= 200, "Parked is {size} bytes");
    }
}
