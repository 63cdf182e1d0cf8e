//! Accepting connections and driving them: connection caps, the TLS
//! handshake, HTTP/1.1 sessions (`server.rs`) or HTTP/2 (hyper), and the
//! parking of idle keep-alive connections.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use http::Request;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, watch},
};
use tokio_rustls::server::TlsStream;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{
    ListenerSpec, Shared, handler,
    server::{self, ClientBody, Ended, Prefixed, Settings, Verdict},
};

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

/// The head limits, read once per connection.
#[derive(Clone, Copy)]
struct HeadLimits {
    max_head: usize,
    max_headers: usize,
}

impl HeadLimits {
    /// An HTTP/1.1 session's settings; `detect_h2` while the connection
    /// has not shown which protocol it speaks.
    fn settings(self, spec: &ListenerSpec, detect_h2: bool) -> Settings {
        Settings {
            max_head: self.max_head,
            max_headers: self.max_headers,
            header_read: spec.config.header_read_timeout,
            keepalive: spec.config.keepalive_timeout,
            detect_h2,
        }
    }
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
    // lives, which an upgraded connection's tunnel extends past its
    // session.
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
        serve_plain(stream, info, spec, shared, activity, limits, false).await;
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
                serve_h2(tls, &info, &spec, &shared, &activity, limits).await;
                return;
            }
            serve_tls_http1(tls, &info, &spec, &shared, &activity, limits).await;
        }
        Ok(Err(error)) => debug!(peer = %info.peer, %error, "TLS handshake failed"),
        Err(_) => debug!(peer = %info.peer, "TLS handshake timed out"),
    }
}

/// An HTTP/1 connection over TLS, session by session: it parks as a plain
/// one does (the session and its buffers freed), but in its own task, with
/// its TLS session: the socket waits for readability here, and its next
/// bytes start a new session.
async fn serve_tls_http1(
    tls: TlsStream<TcpStream>,
    info: &Arc<ConnInfo>,
    spec: &ListenerSpec,
    shared: &Arc<Shared>,
    activity: &Arc<Activity>,
    limits: HeadLimits,
) {
    let mut draining = shared.draining.clone();
    let mut served = false;
    let mut tls = tls;
    loop {
        let settings = limits.settings(spec, !served);
        // Boxed: the session exists only while requests come.
        let ended = Box::pin(server::serve(tls, settings, info, shared, activity)).await;
        match ended {
            Ended::Closed => return,
            Ended::Http2 { io, read } => {
                let io = Prefixed::new(read, io);
                serve_h2(io, info, spec, shared, activity, limits).await;
                return;
            }
            Ended::Idle { io, served: s } => {
                served |= s;
                tls = io;
            }
        }
        if !wait_readable(&tls, activity, spec.config.keepalive_timeout, &mut draining).await {
            // Closed as a session closes one: close_notify, then FIN.
            let _ = tokio::time::timeout(CLOSE_NOTIFY, tls.shutdown()).await;
            return;
        }
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

/// A plain connection's session: requests are served while they come;
/// when none has come for a while, the session ends and the connection
/// parks: its buffers are freed, this task ends, and the socket waits in
/// the daemon's set of idle connections (see [`super::idle`]) with a
/// [`Parked`] copy of what it takes to serve it again, as an idle
/// keep-alive connection waits in nginx: without a buffer, a task or a
/// timer of its own. Its next bytes start a new session on a new task
/// ([`resume`]).
async fn serve_plain(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    spec: Arc<ListenerSpec>,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    limits: HeadLimits,
    served: bool,
) {
    let settings = limits.settings(&spec, !served);
    // Boxed: a session (its buffers' owners, the handler's future) is
    // large, and lives only while requests come.
    let session = Box::pin(server::serve(stream, settings, &info, &shared, &activity));
    let (stream, served) = match session.await {
        Ended::Closed => return,
        Ended::Http2 { io, read } => {
            let io = Prefixed::new(read, io);
            serve_h2(io, &info, &spec, &shared, &activity, limits).await;
            return;
        }
        Ended::Idle { io, served: s } => (io, served || s),
    };
    if *shared.draining.borrow() {
        return;
    }
    let socket = match stream.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            debug!(peer = %info.peer, %error, "cannot park the connection; closed");
            return;
        }
    };
    let deadline = activity.idle_deadline(spec.config.keepalive_timeout);
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
    tracker.spawn(serve_plain(
        stream,
        Arc::new(info),
        spec,
        shared.clone(),
        activity,
        limits,
        served,
    ));
}

/// An HTTP/2 connection, served by hyper until it ends: the client
/// closed, it stayed idle past the keep-alive timeout, or the daemon
/// drained.
async fn serve_h2<I>(
    io: I,
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
        service_fn(move |req: Request<Incoming>| {
            // HTTP/2 frames its messages itself: no framing verdict, and
            // the header count is the handler's to check.
            let handled = handler::handle(
                req.map(ClientBody::H2),
                Verdict::Clean,
                info.clone(),
                shared.clone(),
                activity.clone(),
            );
            async move {
                // hyper writes the map: fields still in an upstream's head
                // join it (the handler leaves none there for HTTP/2).
                Ok::<_, Infallible>(handled.await.into_response())
            }
        })
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let keepalive = spec.config.keepalive_timeout;
    let mut draining = shared.draining.clone();
    let mut closing = false;
    if *draining.borrow_and_update() {
        conn.as_mut().graceful_shutdown();
        closing = true;
    }
    let mut drained = std::pin::pin!(draining.changed());
    let mut idle = std::pin::pin!(tokio::time::sleep_until(activity.idle_deadline(keepalive)));
    std::future::poll_fn(|cx| {
        loop {
            if !closing && drained.as_mut().poll(cx).is_ready() {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                if let Err(error) = result {
                    debug!(%error, "connection ended with an error");
                }
                return Poll::Ready(());
            }
            if closing || idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Idle past the keep-alive timeout with no stream open: close
            // between requests; otherwise look again later.
            if activity.in_flight.load(Ordering::Relaxed) == 0
                && tokio::time::Instant::now() >= activity.idle_deadline(keepalive)
            {
                conn.as_mut().graceful_shutdown();
                closing = true;
                continue;
            }
            let next = activity
                .idle_deadline(keepalive)
                .max(tokio::time::Instant::now() + keepalive.min(Duration::from_secs(1)));
            idle.as_mut().reset(next);
        }
    })
    .await
}

/// A connection's activity, shared by its sessions, its requests and a
/// tunnel it may become.
pub struct Activity {
    _counted: Counted,
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` when the last request finished.
    idle_since: AtomicU64,
}

impl Activity {
    fn new(counted: Counted) -> Self {
        Self {
            _counted: counted,
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Notes that the connection is idle from now.
    fn went_idle(&self) {
        self.idle_since.store(self.now_ms(), Ordering::Relaxed);
    }

    /// When an idle connection's keep-alive clock expires.
    fn idle_deadline(&self, keepalive: Duration) -> tokio::time::Instant {
        let idle_since = self.idle_since.load(Ordering::Relaxed);
        let at = self.epoch + Duration::from_millis(idle_since + 1) + keepalive;
        tokio::time::Instant::from_std(at)
    }

    /// A request is being handled until the guard drops (after its
    /// response body is written).
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
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
            a.went_idle();
        }
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
