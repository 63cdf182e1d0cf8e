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
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, ConfigureEvent, Decision, Event, MAX_MESSAGE_SIZE, extensions,
    frame::{self, FrameError, SharedWriter},
    socket::{self, ReadHalf, WriteHalf},
};
use tokio::{
    io::{AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{AgentError, outgoing::Outgoing};

type Reply = oneshot::Sender<Result<AgentResponse, AgentError>>;

/// One multiplexed connection: a shared writer (each call writes its own
/// frame, or several at once under contention, with no hand-over to a
/// writer task), a reader task and the calls waiting for their answers.
struct Mux {
    writer: SharedWriter<WriteHalf>,
    pending: Mutex<HashMap<u64, Reply>>,
    next_id: AtomicU64,
    alive: AtomicBool,
    /// Ends the reader and writer tasks, which close the socket.
    closed: CancellationToken,
}

impl Mux {
    fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.writer.is_broken()
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Reply>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every waiting call with `error` and refuses new ones.
    fn fail_all(&self, error: impl Fn() -> AgentError) {
        self.alive.store(false, Ordering::Release);
        self.closed.cancel();
        for (_, reply) in self.pending().drain() {
            let _ = reply.send(Err(error()));
        }
    }

    async fn call(
        self: &Arc<Self>,
        mut request: Outgoing<'_>,
    ) -> Result<AgentResponse, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = request.frame(Some(id))?;
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id, tx);
        // Removes the entry if this call is dropped first (its timeout),
        // so that a late answer finds nobody and is discarded.
        let _forget = Forget { mux: self, id };
        if !self.alive() {
            return Err(AgentError::Closed {
                reason: "the connection to the agent closed".to_owned(),
            });
        }
        if let Err(e) = self.writer.send(&frame).await {
            debug!(error = %e, "agent connection write failed");
            self.fail_all(|| AgentError::Closed {
                reason: format!("writing to the agent failed: {e}"),
            });
            return Err(AgentError::Closed {
                reason: format!("writing to the agent failed: {e}"),
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(AgentError::Closed {
                reason: "the connection to the agent closed".to_owned(),
            })
        })
    }
}

struct Forget<'a> {
    mux: &'a Mux,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.mux.pending().remove(&self.id);
    }
}

/// Reads answers and hands each to the call with its id. Buffered: under
/// load one read brings many answers.
async fn read_loop(mux: Arc<Mux>, r: ReadHalf, agent: String) {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    // One buffer for every frame, and one registration for the end.
    let mut frame = Vec::new();
    let closed = mux.closed.cancelled();
    tokio::pin!(closed);
    loop {
        let read = tokio::select! {
            read = frame::read_frame_into(&mut r, MAX_MESSAGE_SIZE, &mut frame) => read,
            _ = &mut closed => return,
        };
        match read {
            Ok(true) => {}
            Ok(false) => {
                mux.fail_all(|| AgentError::Closed {
                    reason: "the agent closed the connection".to_owned(),
                });
                return;
            }
            Err(e) => {
                warn!(agent = %agent, error = %e, "closing the agent connection: bad frame");
                let kind = FrameKind::of(&e);
                mux.fail_all(|| kind.error());
                return;
            }
        }
        // The id first: an answer that fails validation still fails only
        // its own call.
        let parsed = match std::str::from_utf8(&frame) {
            // One pass for UTF-8 over the frame, not one per string.
            Ok(text) => serde_json::from_str::<AgentResponse>(text),
            Err(_) => serde_json::from_slice(&frame),
        };
        let response = match parsed {
            Ok(r) => r,
            Err(e) => {
                warn!(agent = %agent, error = %e, "closing the agent connection: an answer is not valid JSON");
                let text = e.to_string();
                mux.fail_all(|| AgentError::Protocol {
                    reason: format!("invalid JSON: {text}"),
                });
                return;
            }
        };
        let Some(id) = response.id else {
            warn!(agent = %agent, "closing the agent connection: an answer on a multiplexed connection has no id");
            mux.fail_all(|| AgentError::Protocol {
                reason: "answer without an id on a multiplexed connection".to_owned(),
            });
            return;
        };
        let reply = mux.pending().remove(&id);
        match reply {
            Some(reply) => {
                let result = response
                    .validate()
                    .map(|()| response)
                    .map_err(AgentError::from);
                let _ = reply.send(result);
            }
            // Its call timed out and left.
            None => debug!(agent = %agent, id, "late answer discarded"),
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

    pub async fn send(&self, request: Outgoing<'_>) -> Result<AgentResponse, AgentError> {
        if let Some(mux) = self.live_mux() {
            return mux.call(request).await;
        }
        if let Some(conn) = self.take_idle() {
            return self.sequential(conn, request).await;
        }
        let conn = {
            let _one = self.connecting.lock().await;
            // Someone may have connected while this call waited.
            if let Some(mux) = self.live_mux() {
                drop(_one);
                return mux.call(request).await;
            }
            self.connect().await?
        };
        match conn {
            Opened::Mux(mux) => mux.call(request).await,
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
        let mux = Arc::new(Mux {
            writer: SharedWriter::new(w),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            closed: CancellationToken::new(),
        });
        tokio::spawn(read_loop(mux.clone(), r, self.agent.clone()));
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
        // The reader and writer tasks hold the connection; ending the
        // writer's channel and failing the calls lets them finish.
        if let Some(mux) = self.mux.lock().unwrap_or_else(|p| p.into_inner()).take() {
            mux.fail_all(|| AgentError::Closed {
                reason: "the agent was removed from the configuration".to_owned(),
            });
        }
    }
}
