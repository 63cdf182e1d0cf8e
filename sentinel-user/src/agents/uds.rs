//! The Unix-socket transport: 4-byte big-endian length, then JSON.
//!
//! Every connection begins with the `configure` handshake, which offers the
//! `multiplex` extension. An agent that accepts it gets one connection on
//! which any number of calls are in flight, each request carrying an `id`
//! that its answer echoes; answers may come in any order. An agent that
//! does not (one written from the seed's text alone) gets one call at a
//! time per connection, from a pool of connections that grows with the
//! concurrent calls (bounded by the agent's `max-concurrent-calls`).
//!
//! Connections are registered with the reactor for reading only
//! ([`sentinel_agent_protocol::socket`]): the agent reading a request does
//! not wake the proxy's worker.
//!
//! A connection whose stream can no longer be trusted (a garbage or
//! oversized frame, a call abandoned half way by its timeout, the agent
//! gone) is closed; the next call opens a fresh one.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
};

use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, ConfigureEvent, Decision, Event, MAX_MESSAGE_SIZE, extensions,
    frame::{self, FrameBuffer, FrameError, SharedWriter},
    socket::{self, ReadHalf, WriteHalf},
};
use tokio::{
    io::{AsyncWriteExt as _, BufReader},
    net::UnixStream,
};
use tracing::{debug, warn};

use super::{AgentError, outgoing::Outgoing};

/// One multiplexed connection: a shared writer (each call writes its own
/// frame, or several at once under contention, with no hand-over to a
/// writer task) and the calls waiting for their answers, one of which
/// reads the connection for all of them.
///
/// There is no reader task: the answer to a lone call (the usual case)
/// wakes that call's own task, which reads and parses it, with no second
/// task to schedule and no channel between the two. While several calls
/// wait, the one reading hands each other answer to its call and wakes
/// it; when it has its own, it passes the reading to another waiting
/// call. What was read stays in the connection's [`FrameBuffer`], so a
/// reader dropped at any point (its timeout) loses nothing.
struct Mux {
    writer: SharedWriter<WriteHalf>,
    state: Mutex<State>,
    next_id: AtomicU64,
    alive: AtomicBool,
    agent: String,
}

struct State {
    calls: HashMap<u64, Waiting, BuildHasherDefault<IdHasher>>,
    /// The connection's read side; out of here while a call reads it, and
    /// gone once the connection failed.
    reader: Option<Reader>,
    /// The call that reads for everyone, while one does.
    reading: Option<u64>,
}

/// Hashes call ids, which this side numbers in sequence and nobody else
/// picks: a multiplication spreads them, where SipHash (a third of a
/// call's bookkeeping) defends against keys chosen to collide.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[derive(Default)]
struct Waiting {
    answer: Option<Result<AgentResponse, AgentError>>,
    waker: Option<Waker>,
}

struct Reader {
    half: ReadHalf,
    frames: FrameBuffer,
}

/// How a call's read of the connection ended.
// Returned once per poll and moved straight into the call's result: boxing
// the answer would cost an allocation per call to save a stack copy.
#[allow(clippy::large_enum_variant)]
enum Read {
    /// Its own answer.
    Mine(Result<AgentResponse, AgentError>),
    Pending,
    /// The connection cannot be read any more.
    Failed(Failure),
}

/// Why a connection failed, kept to be reported to every waiting call.
#[derive(Clone)]
enum Failure {
    Frame(FrameKind),
    Closed,
    Protocol(String),
}

impl Failure {
    fn error(&self) -> AgentError {
        match self {
            Failure::Frame(kind) => kind.error(),
            Failure::Closed => AgentError::Closed {
                reason: "the agent closed the connection".to_owned(),
            },
            Failure::Protocol(reason) => AgentError::Protocol {
                reason: reason.clone(),
            },
        }
    }
}

/// A call's result, and whether its event could have reached the agent.
type Called = Result<AgentResponse, (AgentError, Delivery)>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// The connection was found closed by the agent before any of the
    /// event was written: it can go on a new connection.
    Unsent,
    Maybe,
}

impl Mux {
    fn new(agent: &str, r: ReadHalf, w: WriteHalf) -> Self {
        Self {
            writer: SharedWriter::new(w),
            state: Mutex::new(State {
                calls: HashMap::default(),
                reader: Some(Reader {
                    half: r,
                    frames: FrameBuffer::new(MAX_MESSAGE_SIZE),
                }),
                reading: None,
            }),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            agent: agent.to_owned(),
        }
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.writer.is_broken()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every waiting call with `failure` and refuses new ones; the
    /// read side closes.
    fn fail_all(&self, failure: &Failure) {
        self.alive.store(false, Ordering::Release);
        let mut state = self.state();
        state.reader = None;
        state.reading = None;
        for waiting in state.calls.values_mut() {
            if waiting.answer.is_none() {
                waiting.answer = Some(Err(failure.error()));
            }
            if let Some(waker) = waiting.waker.take() {
                waker.wake();
            }
        }
    }

    async fn call(self: &Arc<Self>, request: &mut Outgoing<'_>) -> Called {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = request
            .frame(Some(id))
            .map_err(|e| (e.into(), Delivery::Unsent))?;
        self.state().calls.insert(id, Waiting::default());
        // Removes the entry if this call is dropped first (its timeout),
        // so that a late answer finds nobody and is discarded, and passes
        // the reading on if this call had it.
        let _forget = Forget { mux: self, id };
        let closed = || AgentError::Closed {
            reason: "the connection to the agent closed".to_owned(),
        };
        if !self.alive() {
            return Err((closed(), Delivery::Unsent));
        }
        if let Err(e) = self.writer.send(&frame).await {
            debug!(error = %e, "agent connection write failed");
            let delivery = if e.kind() == std::io::ErrorKind::BrokenPipe {
                Delivery::Unsent
            } else {
                Delivery::Maybe
            };
            let reason = format!("writing to the agent failed: {e}");
            self.fail_all(&Failure::Protocol(reason.clone()));
            return Err((AgentError::Closed { reason }, delivery));
        }
        std::future::poll_fn(|cx| self.poll_answer(id, cx))
            .await
            .map_err(|e| (e, Delivery::Maybe))
    }

    fn poll_answer(
        &self,
        id: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<AgentResponse, AgentError>> {
        let mut state = self.state();
        let reading = state.reading;
        let Some(waiting) = state.calls.get_mut(&id) else {
            return Poll::Ready(Err(Failure::Closed.error()));
        };
        if let Some(answer) = waiting.answer.take() {
            return Poll::Ready(answer);
        }
        if reading.is_some_and(|r| r != id) {
            // Another call reads, and will wake this one.
            match &mut waiting.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let Some(mut reader) = state.reader.take() else {
            return Poll::Ready(Err(Failure::Closed.error()));
        };
        state.reading = Some(id);
        drop(state);
        let read = self.read_answers(&mut reader, id, cx);
        let mut state = self.state();
        match read {
            Read::Pending => {
                state.reader = Some(reader);
                Poll::Pending
            }
            Read::Mine(answer) => {
                state.reader = Some(reader);
                state.reading = None;
                pass_reading(&mut state);
                Poll::Ready(answer)
            }
            Read::Failed(failure) => {
                drop(state);
                drop(reader);
                self.fail_all(&failure);
                Poll::Ready(Err(failure.error()))
            }
        }
    }

    /// Reads answers until this call's own comes, handing the others to
    /// their calls.
    fn read_answers(&self, reader: &mut Reader, me: u64, cx: &mut Context<'_>) -> Read {
        let agent = &self.agent;
        loop {
            loop {
                let frame = match reader.frames.next_frame() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(agent = %agent, error = %e, "closing the agent connection: bad frame");
                        return Read::Failed(Failure::Frame(FrameKind::of(&e)));
                    }
                };
                let response = match AgentResponse::parse(frame) {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(agent = %agent, error = %e, "closing the agent connection: an answer is not valid JSON");
                        return Read::Failed(Failure::Protocol(format!("invalid JSON: {e}")));
                    }
                };
                // The id first: an answer that fails validation still
                // fails only its own call.
                let Some(id) = response.id else {
                    warn!(agent = %agent, "closing the agent connection: an answer on a multiplexed connection has no id");
                    return Read::Failed(Failure::Protocol(
                        "answer without an id on a multiplexed connection".to_owned(),
                    ));
                };
                let result = response
                    .validate()
                    .map(|()| response)
                    .map_err(AgentError::from);
                if id == me {
                    return Read::Mine(result);
                }
                let mut state = self.state();
                match state.calls.get_mut(&id) {
                    Some(waiting) => {
                        waiting.answer = Some(result);
                        if let Some(waker) = waiting.waker.take() {
                            waker.wake();
                        }
                    }
                    // Its call timed out and left.
                    None => debug!(agent = %agent, id, "late answer discarded"),
                }
            }
            match reader.frames.poll_fill(&mut reader.half, cx) {
                Poll::Pending => return Read::Pending,
                Poll::Ready(Ok(0)) => return Read::Failed(Failure::Closed),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    if !matches!(e, FrameError::Truncated) {
                        warn!(agent = %agent, error = %e, "closing the agent connection: read failed");
                    }
                    return Read::Failed(Failure::Frame(FrameKind::of(&e)));
                }
            }
        }
    }
}

/// Wakes a call still waiting for its answer, if there is one, to take
/// over the reading.
fn pass_reading(state: &mut State) {
    if state.reader.is_none() {
        return;
    }
    if let Some(waker) = state
        .calls
        .values_mut()
        .filter(|w| w.answer.is_none())
        .find_map(|w| w.waker.take())
    {
        waker.wake();
    }
}

struct Forget<'a> {
    mux: &'a Mux,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut state = self.mux.state();
        state.calls.remove(&self.id);
        if state.reading.is_none_or(|r| r == self.id) {
            state.reading = None;
            pass_reading(&mut state);
        }
    }
}

/// A frame error, kept to be reported to every waiting call.
#[derive(Clone, Copy)]
enum FrameKind {
    TooLarge(usize),
    Truncated,
    Io,
}

impl FrameKind {
    fn of(e: &FrameError) -> Self {
        match e {
            FrameError::TooLarge { len, .. } => FrameKind::TooLarge(*len),
            FrameError::Truncated => FrameKind::Truncated,
            FrameError::Io(_) => FrameKind::Io,
        }
    }

    fn error(self) -> AgentError {
        match self {
            FrameKind::TooLarge(len) => AgentError::TooLarge { len },
            FrameKind::Truncated => AgentError::Closed {
                reason: "the agent closed the connection in the middle of a frame".to_owned(),
            },
            FrameKind::Io => AgentError::Closed {
                reason: "reading from the agent failed".to_owned(),
            },
        }
    }
}

/// A connection used for one call at a time.
struct Sequential {
    reader: BufReader<ReadHalf>,
    writer: WriteHalf,
}

impl Sequential {
    async fn call(&mut self, request: &mut Outgoing<'_>) -> Result<AgentResponse, AgentError> {
        let frame = request.frame(None)?;
        self.writer
            .write_all(&frame)
            .await
            .map_err(FrameError::Io)?;
        self.writer.flush().await.map_err(FrameError::Io)?;
        match frame::read_frame(&mut self.reader, MAX_MESSAGE_SIZE).await? {
            Some(answer) => Ok(AgentResponse::from_json(&answer)?),
            None => Err(AgentError::Closed {
                reason: "the agent closed the connection".to_owned(),
            }),
        }
    }
}

pub struct UdsClient {
    agent: String,
    path: PathBuf,
    configure: ConfigureEvent,
    /// The multiplexed connection, once the agent accepted it.
    mux: Mutex<Option<Arc<Mux>>>,
    /// Idle connections of an agent that did not accept multiplexing.
    idle: Mutex<Vec<Sequential>>,
    /// Serializes connecting, so a burst of first calls opens one
    /// connection, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl UdsClient {
    pub fn new(agent: &str, path: PathBuf, mut configure: ConfigureEvent) -> Self {
        configure
            .extensions
            .insert(0, extensions::MULTIPLEX.to_owned());
        Self {
            agent: agent.to_owned(),
            path,
            configure,
            mux: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn live_mux(&self) -> Option<Arc<Mux>> {
        let guard = self.mux.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|m| m.alive()).cloned()
    }

    fn take_idle(&self) -> Option<Sequential> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_idle(&self, conn: Sequential) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    pub async fn send(&self, mut request: Outgoing<'_>) -> Result<AgentResponse, AgentError> {
        if let Some(mux) = self.live_mux() {
            match mux.call(&mut request).await {
                // Nobody reads an idle connection, so an agent that went
                // away in the meantime shows only now: the event never
                // left, and goes on a new connection.
                Err((e, Delivery::Unsent)) => {
                    debug!(agent = %self.agent, error = %e, "agent connection found closed; reconnecting")
                }
                other => return other.map_err(|(e, _)| e),
            }
        }
        if let Some(conn) = self.take_idle() {
            return self.sequential(conn, request).await;
        }
        let conn = {
            let _one = self.connecting.lock().await;
            // Someone may have connected while this call waited.
            if let Some(mux) = self.live_mux() {
                drop(_one);
                return mux.call(&mut request).await.map_err(|(e, _)| e);
            }
            self.connect().await?
        };
        match conn {
            Opened::Mux(mux) => mux.call(&mut request).await.map_err(|(e, _)| e),
            Opened::Sequential(conn) => self.sequential(conn, request).await,
        }
    }

    async fn sequential(
        &self,
        mut conn: Sequential,
        mut request: Outgoing<'_>,
    ) -> Result<AgentResponse, AgentError> {
        // If this future is dropped (its timeout) the connection goes with
        // it: its next frame would be this call's late answer.
        let answer = conn.call(&mut request).await;
        if answer.is_ok() {
            self.put_idle(conn);
        }
        answer
    }

    /// Opens and configures a connection.
    async fn connect(&self) -> Result<Opened, AgentError> {
        let mut stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|e| AgentError::Connect {
                    reason: format!("{}: {e}", self.path.display()),
                })?;
        let configure = AgentRequest::new(Event::Configure(self.configure.clone()));
        frame::write_frame(&mut stream, &configure.to_json()).await?;
        let answer = match frame::read_frame(&mut stream, MAX_MESSAGE_SIZE).await? {
            Some(answer) => AgentResponse::from_json(&answer)?,
            None => {
                return Err(AgentError::Closed {
                    reason: "the agent closed the connection during configure".to_owned(),
                });
            }
        };
        if answer.decision != Decision::Allow {
            return Err(AgentError::Refused {
                decision: answer.decision.name(),
            });
        }
        let (r, w) = socket::split(stream).map_err(FrameError::Io)?;
        if !answer.extensions.iter().any(|e| e == extensions::MULTIPLEX) {
            debug!(agent = %self.agent, "agent answers one call at a time per connection");
            return Ok(Opened::Sequential(Sequential {
                reader: BufReader::new(r),
                writer: w,
            }));
        }
        debug!(agent = %self.agent, "agent accepted multiplexing");
        let mux = Arc::new(Mux::new(&self.agent, r, w));
        *self.mux.lock().unwrap_or_else(|p| p.into_inner()) = Some(mux.clone());
        Ok(Opened::Mux(mux))
    }
}

enum Opened {
    Mux(Arc<Mux>),
    Sequential(Sequential),
}

impl Drop for UdsClient {
    fn drop(&mut self) {
        // Calls in flight hold the connection: failing them ends it.
        if let Some(mux) = self.mux.lock().unwrap_or_else(|p| p.into_inner()).take() {
            mux.fail_all(&Failure::Protocol(
                "the agent was removed from the configuration".to_owned(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sentinel_agent_protocol::{HeaderOp, RequestHeadersEvent};
    use tokio::net::UnixListener;

    use super::*;

    /// A multiplexing agent that answers each `request_headers` event with
    /// its uri in an `X-Uri` header: those whose uri starts with `/ignore`
    /// never; the others once `batch` of them have come, `delay` later, in
    /// reverse order. After `close_after` answers on a connection it
    /// closes it and waits for the next.
    async fn agent(listener: UnixListener, batch: usize, delay: Duration, close_after: usize) {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let configure = frame::read_frame(&mut stream, MAX_MESSAGE_SIZE)
                .await
                .unwrap()
                .unwrap();
            assert!(AgentRequest::from_json(&configure).is_ok());
            let accept = AgentResponse {
                extensions: vec![extensions::MULTIPLEX.to_owned()],
                ..AgentResponse::allow()
            };
            frame::write_frame(&mut stream, &accept.to_json())
                .await
                .unwrap();
            let mut held = Vec::new();
            let mut answered = 0;
            while answered < close_after {
                let Ok(Some(frame)) = frame::read_frame(&mut stream, MAX_MESSAGE_SIZE).await else {
                    break;
                };
                let request = AgentRequest::from_json(&frame).unwrap();
                let Event::RequestHeaders(event) = request.event else {
                    panic!("not request_headers");
                };
                if event.uri.starts_with("/ignore") {
                    continue;
                }
                held.push((request.id, event.uri));
                if held.len() < batch {
                    continue;
                }
                tokio::time::sleep(delay).await;
                for (id, uri) in held.drain(..).rev() {
                    let answer = AgentResponse {
                        id,
                        request_headers: vec![HeaderOp::Set {
                            name: "X-Uri".into(),
                            value: uri,
                        }],
                        ..AgentResponse::allow()
                    };
                    frame::write_frame(&mut stream, &answer.to_json())
                        .await
                        .unwrap();
                    answered += 1;
                }
            }
        }
    }

    fn event(uri: &str) -> Outgoing<'static> {
        Outgoing::Request(AgentRequest::new(Event::RequestHeaders(
            RequestHeadersEvent {
                uri: uri.to_owned(),
                ..RequestHeadersEvent::default()
            },
        )))
    }

    fn uri_of(answer: &AgentResponse) -> &str {
        match answer.request_headers.as_slice() {
            [HeaderOp::Set { value, .. }] => value,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    fn start(
        batch: usize,
        delay: Duration,
        close_after: usize,
    ) -> (tempfile::TempDir, Arc<UdsClient>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(agent(listener, batch, delay, close_after));
        let configure = ConfigureEvent {
            agent_id: "test".into(),
            config: serde_json::Value::Null,
            extensions: Vec::new(),
            kernel_push: None,
        };
        (dir, Arc::new(UdsClient::new("test", path, configure)))
    }

    /// Calls waiting together each get their own answer, whichever of
    /// them reads, and a reading call that gives up (its timeout, as
    /// `Agent::send` drops it) passes the reading on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_calls_share_the_reading() {
        let (_dir, client) = start(3, Duration::from_millis(300), usize::MAX);
        // First, so that it connects and reads; never answered.
        let c = client.clone();
        let ignored = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(150), c.send(event("/ignore"))).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move { c.send(event(&format!("/call/{i}"))).await })
            })
            .collect();
        assert!(ignored.await.unwrap().is_err(), "never answered");
        for (i, call) in calls.into_iter().enumerate() {
            let answer = tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .expect("answered after the reader left")
                .unwrap()
                .unwrap();
            assert_eq!(uri_of(&answer), format!("/call/{i}"));
        }
    }

    /// An agent that closed an idle connection is reached again on a new
    /// one, without failing the call that finds it closed.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        let (_dir, client) = start(1, Duration::ZERO, 1);
        for i in 0..3 {
            let uri = format!("/call/{i}");
            let answer = client.send(event(&uri)).await.unwrap();
            assert_eq!(uri_of(&answer), uri);
            // The agent closes the connection after each answer.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
}
