//! Scriptable agents for the agent tests, on all three transports.
//!
//! A [`ScriptAgent`] answers every event with what its [`Handler`] says,
//! which may also be a fault no real agent should commit: a garbage or
//! oversized frame, a wrong version, silence, a closed connection. It
//! records every request it received and counts connections and calls in
//! flight, so tests can check what the proxy sent and how (one connection,
//! many calls at once).
//!
//! Everything runs on the calling test's Tokio runtime.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, Decision, Event, EventType, MAX_MESSAGE_SIZE, extensions, frame,
    grpc::pb::{
        self,
        agent_processor_server::{AgentProcessor, AgentProcessorServer},
    },
};
use tempfile::TempDir;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, UnixListener, UnixStream},
    sync::Mutex as AsyncMutex,
    task::JoinHandle,
};

/// What the agent does with one request.
pub enum Reply {
    Answer(AgentResponse),
    /// Answer after a pause.
    After(Duration, AgentResponse),
    /// Write these bytes as one frame's payload (garbage JSON, say).
    Frame(Vec<u8>),
    /// Write these bytes as they are, no framing.
    Bytes(Vec<u8>),
    /// Never answer.
    Hang,
    /// Close the connection without answering.
    Close,
}

pub type Handler = Arc<dyn Fn(&AgentRequest) -> Reply + Send + Sync>;

/// Answers `allow` to everything.
pub fn allow_all() -> Handler {
    Arc::new(|_| Reply::Answer(AgentResponse::allow()))
}

/// Answers `handler(request)` to events, `allow` to `configure`.
pub fn on_events(f: impl Fn(&AgentRequest) -> Reply + Send + Sync + 'static) -> Handler {
    Arc::new(move |r| match r.event {
        Event::Configure(_) => Reply::Answer(AgentResponse::allow()),
        _ => f(r),
    })
}

#[derive(Default)]
struct State {
    handler: Mutex<Option<Handler>>,
    seen: Mutex<Vec<AgentRequest>>,
    connections: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl State {
    fn handler(&self) -> Handler {
        self.handler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(allow_all)
    }

    fn record(&self, request: &AgentRequest) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request.clone());
    }

    fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    fn track(&self, task: JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }
}

struct InFlight<'a>(&'a State);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs the handler for `request`: the answer to send, or `None` when the
/// reply is a fault the caller carries out.
async fn resolve(state: &State, request: &AgentRequest) -> Reply {
    state.record(request);
    let _in = state.enter();
    let reply = (state.handler())(request);
    match reply {
        Reply::After(pause, answer) => {
            tokio::time::sleep(pause).await;
            Reply::Answer(answer)
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Reply::Hang
        }
        other => other,
    }
}

/// Where a script agent listens.
pub enum Listen {
    /// A Unix socket; `multiplex` says whether it accepts the extension.
    Unix {
        multiplex: bool,
    },
    Grpc,
    Http,
}

/// A running scriptable agent.
pub struct ScriptAgent {
    state: Arc<State>,
    /// The socket path (Unix) or `http(s)://127.0.0.1:port` (gRPC, HTTP).
    pub address: String,
    _dir: TempDir,
}

impl ScriptAgent {
    /// A Unix-socket agent. `multiplex`: whether it accepts the
    /// extension when offered.
    pub async fn unix(multiplex: bool, handler: Handler) -> Self {
        Self::start(Listen::Unix { multiplex }, handler, None).await
    }

    /// An agent on `listen`, with TLS when `tls` gives a server config.
    pub async fn start(
        listen: Listen,
        handler: Handler,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sentinel-agent-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let state = Arc::new(State::default());
        *state.handler.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
        let address = match listen {
            Listen::Unix { multiplex } => {
                let path = dir.path().join("agent.sock");
                let listener = UnixListener::bind(&path)
                    .unwrap_or_else(|e| panic!("cannot bind {}: {e}", path.display()));
                let task = tokio::spawn(unix_accept(listener, state.clone(), multiplex));
                state.track(task);
                path.display().to_string()
            }
            Listen::Grpc | Listen::Http => {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .unwrap_or_else(|e| panic!("cannot bind: {e}"));
                let addr = listener
                    .local_addr()
                    .unwrap_or_else(|e| panic!("no local address: {e}"));
                let scheme = if tls.is_some() { "https" } else { "http" };
                let grpc = matches!(listen, Listen::Grpc);
                let task = tokio::spawn(tcp_accept(listener, state.clone(), grpc, tls));
                state.track(task);
                if grpc {
                    format!("{scheme}://localhost:{}", addr.port())
                } else {
                    format!("{scheme}://localhost:{}/agent", addr.port())
                }
            }
        };
        Self {
            state,
            address,
            _dir: dir,
        }
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.address)
    }

    pub fn set(&self, handler: Handler) {
        *self.state.handler.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// Every request received, in order of arrival.
    pub fn seen(&self) -> Vec<AgentRequest> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The received events of one type.
    pub fn events(&self, kind: EventType) -> Vec<Event> {
        self.seen()
            .into_iter()
            .filter(|r| r.event.event_type() == kind)
            .map(|r| r.event)
            .collect()
    }

    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every connection (the agent process
    /// died); a Unix socket's file stays, as a killed process leaves it.
    pub fn kill(&self) {
        for task in self
            .state
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Path where the socket file would be, for `unix-socket` lines.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(&self.address)
    }
}

impl Drop for ScriptAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn unix_accept(listener: UnixListener, state: Arc<State>, multiplex: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(unix_connection(stream, state.clone(), multiplex));
        state.track(task);
    }
}

async fn unix_connection(stream: UnixStream, state: Arc<State>, multiplex: bool) {
    let (mut r, w) = stream.into_split();
    let w = Arc::new(AsyncMutex::new(w));
    let mut multiplexed = false;
    loop {
        let Ok(Some(bytes)) = frame::read_frame(&mut r, MAX_MESSAGE_SIZE).await else {
            return;
        };
        let request = match AgentRequest::from_json(&bytes) {
            Ok(r) => r,
            Err(_) => return,
        };
        if let Event::Configure(c) = &request.event {
            multiplexed = multiplex && c.extensions.iter().any(|e| e == extensions::MULTIPLEX);
        }
        let is_configure = matches!(request.event, Event::Configure(_));
        let state = state.clone();
        let w = w.clone();
        let work = async move {
            let id = request.id;
            let reply = resolve(&state, &request).await;
            let mut w = w.lock().await;
            match reply {
                Reply::Answer(mut answer) => {
                    if is_configure && multiplexed {
                        answer.extensions.push(extensions::MULTIPLEX.to_owned());
                    }
                    if answer.id.is_none() {
                        answer.id = id;
                    }
                    frame::write_frame(&mut *w, &answer.to_json()).await.is_ok()
                }
                Reply::Frame(payload) => {
                    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
                    out.extend_from_slice(&payload);
                    w.write_all(&out).await.is_ok()
                }
                Reply::Bytes(bytes) => w.write_all(&bytes).await.is_ok(),
                Reply::Close => {
                    let _ = w.shutdown().await;
                    false
                }
                Reply::Hang | Reply::After(..) => true,
            }
        };
        if multiplexed && !is_configure {
            tokio::spawn(work);
        } else if !work.await {
            return;
        }
    }
}

struct Grpc(Arc<State>);

#[tonic::async_trait]
impl AgentProcessor for Grpc {
    async fn process_event(
        &self,
        request: tonic::Request<pb::AgentRequest>,
    ) -> Result<tonic::Response<pb::AgentResponse>, tonic::Status> {
        let request = AgentRequest::try_from(request.into_inner())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        match resolve(&self.0, &request).await {
            Reply::Answer(answer) => Ok(tonic::Response::new(pb::AgentResponse::from(&answer))),
            _ => Err(tonic::Status::internal("scripted failure")),
        }
    }
}

async fn http_answer(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        Ok(r)
    };
    if request
        .headers()
        .get(sentinel_agent_protocol::VERSION_HEADER)
        .is_none_or(|v| v != "1")
    {
        return reply(StatusCode::BAD_REQUEST, b"missing version header".to_vec());
    }
    let Ok(body) = request.into_body().collect().await else {
        return reply(StatusCode::BAD_REQUEST, Vec::new());
    };
    let Ok(request) = AgentRequest::from_json(&body.to_bytes()) else {
        return reply(StatusCode::BAD_REQUEST, b"bad json".to_vec());
    };
    match resolve(&state, &request).await {
        Reply::Answer(answer) => reply(StatusCode::OK, answer.to_json()),
        Reply::Frame(bytes) | Reply::Bytes(bytes) => reply(StatusCode::OK, bytes),
        _ => reply(StatusCode::INTERNAL_SERVER_ERROR, Vec::new()),
    }
}

async fn tcp_accept(
    listener: TcpListener,
    state: Arc<State>,
    grpc: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let tls = tls.map(|mut config| {
        let c = Arc::make_mut(&mut config);
        c.alpn_protocols = if grpc {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        tokio_rustls::TlsAcceptor::from(config)
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let state = state.clone();
        let tls = tls.clone();
        let task = tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve(TokioIo::new(tls), state, grpc).await;
                    }
                }
                None => serve(TokioIo::new(stream), state, grpc).await,
            }
        });
        // Connection tasks are not tracked: kill() stops the listener,
        // and connections end with the test.
        drop(task);
    }
}

async fn serve<I>(io: I, state: Arc<State>, grpc: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    if grpc {
        let service = AgentProcessorServer::new(Grpc(state))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let mut svc = service.clone();
            async move {
                use tonic::codegen::Service;
                svc.call(req).await
            }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let service = hyper::service::service_fn(move |req| http_answer(state.clone(), req));
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    }
}

/// An answer with `decision`.
pub fn decide(decision: Decision) -> Reply {
    Reply::Answer(AgentResponse::decide(decision))
}

/// Waits up to `limit` for `done`.
pub async fn until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Unused socket addresses are not needed for Unix agents; TCP agents bind
/// port 0. This names the address of an agent for the KDL line.
pub fn kdl_transport(agent: &ScriptAgent, listen: &str) -> String {
    format!("{listen} \"{}\"", agent.address)
}
