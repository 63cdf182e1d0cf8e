//! The Unix-socket transport: length-prefixed JSON frames
//! ([`sentinel_agent_protocol::frame`]).
//!
//! A connection starts sequential: each request is answered before the
//! next is read, so an old proxy that sends no `configure` is served in
//! order. When the proxy's `configure` offers `multiplex` and the answer
//! accepts it, later requests carry an `id`, run concurrently (at most
//! `max_in_flight` at once) and are answered with their `id` as each
//! finishes. A hook that finishes at once is answered from the reading
//! task itself, and answers are written by whichever task has one ready
//! (frame::SharedWriter), so an answer takes no hop between tasks. The
//! stream is registered for reading only ([`sentinel_agent_protocol::socket`]),
//! so the proxy reading an answer does not wake this side.
//!
//! Anything the connection cannot make sense of — a frame that is not
//! JSON, a length over the limit, another protocol version, the peer
//! closing in the middle of a frame — closes that connection with a logged
//! reason. The listener and the other connections carry on.

use std::{
    fs,
    future::Future,
    io::ErrorKind,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use sentinel_agent_protocol::{
    AgentRequest, Event, MAX_MESSAGE_SIZE, RequestHeadersEvent,
    frame::{self, SharedWriter},
    socket::{self, WriteHalf},
};
use tokio::{
    io::BufReader,
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, error, info_span, warn};

use super::{ServerError, UnixOptions};
use crate::{
    Agent,
    dispatch::{Transport, dispatch},
};

/// A bound socket, and which file it is so that only that file is removed
/// at the end.
pub(super) struct Bound {
    pub listener: UnixListener,
    pub options: UnixOptions,
    identity: (u64, u64),
}

impl Drop for Bound {
    fn drop(&mut self) {
        // Another instance may have replaced the file since; leave its.
        let path = &self.options.path;
        if let Ok(meta) = fs::symlink_metadata(path)
            && (meta.dev(), meta.ino()) == self.identity
            && let Err(error) = fs::remove_file(path)
        {
            warn!(path = %path.display(), %error, "cannot remove the socket file");
        }
    }
}

/// Binds the socket, replacing a stale socket file (one nobody accepts
/// on) but never a live socket or another kind of file.
pub(super) fn bind(options: UnixOptions) -> Result<Bound, ServerError> {
    let path = options.path.clone();
    let io_error = |source| ServerError::UnixSocket {
        path: path.clone(),
        source,
    };
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => return Err(ServerError::SocketInUse { path }),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    debug!(path = %path.display(), "removing a stale socket file");
                    fs::remove_file(&path).map_err(io_error)?;
                }
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(_) => return Err(ServerError::NotASocket { path }),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io_error)?;
    let meta = fs::metadata(&path).map_err(io_error)?;
    let bound = Bound {
        listener,
        identity: (meta.dev(), meta.ino()),
        options,
    };
    // From here on, dropping `bound` removes the file again.
    fs::set_permissions(&path, fs::Permissions::from_mode(bound.options.mode)).map_err(io_error)?;
    Ok(bound)
}

pub(super) async fn serve<A: Agent>(
    bound: Bound,
    agent: Arc<A>,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
) {
    let mut next_conn: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = bound.listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                next_conn += 1;
                let span = info_span!("unix", conn = next_conn);
                tracker.spawn(
                    connection(
                        stream,
                        agent.clone(),
                        bound.options.max_in_flight,
                        stop.clone(),
                        abort.clone(),
                    )
                    .instrument(span),
                );
            }
            Err(error) => {
                // Out of file descriptors and the like: wait rather than spin.
                warn!(%error, "unix socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // `bound` drops here: the socket file goes with it.
}

/// An answer, and the request it answered (to be recycled).
type Worked = (Result<Answered, String>, AgentRequest);

/// What answering one request did to the connection.
struct Answered {
    multiplex: bool,
    refused: bool,
}

async fn connection<A: Agent>(
    stream: UnixStream,
    agent: Arc<A>,
    max_in_flight: usize,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    debug!("connection opened");
    let (read, write) = match socket::split(stream) {
        Ok(halves) => halves,
        Err(error) => {
            warn!(%error, "cannot register the connection; closing it");
            return;
        }
    };
    let mut reader = BufReader::new(read);
    let answers = Arc::new(SharedWriter::new(write));
    // The first failure of a concurrent request closes the connection.
    let (fail, mut failed) = mpsc::channel::<String>(1);
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let mut in_flight = JoinSet::new();
    let mut multiplex = false;
    // Kept across frames: the frame's bytes, and the last answered
    // `request_headers` event, whose strings the next one is read into.
    let mut bytes = Vec::new();
    let mut spare: Option<RequestHeadersEvent> = None;
    // Registered once, not once per frame.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);

    let closing: Option<String> = loop {
        // Only a task in the set reports a failure, so with none the
        // channel needs no watching, only a look for what a task reported
        // before it was reaped.
        if let Ok(reason) = failed.try_recv() {
            break Some(reason);
        }
        let tasks = !in_flight.is_empty();
        // Any branch but the read closes the connection, so a frame cut
        // short by it is never needed again.
        let read = tokio::select! {
            biased;
            Some(reason) = failed.recv(), if tasks => break Some(reason),
            _ = &mut stopped => break None,
            read = frame::read_frame_into(&mut reader, MAX_MESSAGE_SIZE, &mut bytes) => read,
        };
        match read {
            Ok(true) => {}
            Ok(false) => break None,
            Err(e) => break Some(e.to_string()),
        }
        if answers.is_broken() {
            break Some("writing answers failed".to_owned());
        }
        let request = match AgentRequest::from_json_recycling(&bytes, &mut spare) {
            Ok(request) => request,
            Err(e) => break Some(format!("bad frame: {e}")),
        };
        let configure = matches!(request.event, Event::Configure(_));
        debug!(event = %request.event.event_type(), id = ?request.id, "request");

        if multiplex && !configure {
            if request.id.is_none() {
                break Some("request without an id on a multiplexed connection".to_owned());
            }
            // A free slot is the rule; waiting for one, the exception.
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => Ok(slot),
                Err(_) => tokio::select! {
                    biased;
                    Some(reason) = failed.recv() => break Some(reason),
                    _ = &mut stopped => break None,
                    slot = slots.clone().acquire_owned() => slot,
                },
            };
            let Ok(slot) = slot else {
                break Some("request slots closed".to_owned());
            };
            let (agent, answers) = (agent.clone(), answers.clone());
            let mut work: Pin<Box<dyn Future<Output = Worked> + Send>> = Box::pin(async move {
                let _slot = slot;
                let answered = answer(&*agent, &request, &answers).await;
                (answered, request)
            });
            // Most hooks finish at once: answer from here, with no task
            // hand-over. One that has to wait becomes its own task (which
            // polls it again with a real waker).
            match work.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready((Ok(_), request)) => request.recycle(&mut spare),
                Poll::Ready((Err(reason), _)) => break Some(reason),
                Poll::Pending => {
                    let fail = fail.clone();
                    in_flight.spawn(async move {
                        if let (Err(reason), _) = work.await {
                            let _ = fail.try_send(reason);
                        }
                    });
                }
            }
            // Reap what has finished so that the set holds only what runs.
            while in_flight.try_join_next().is_some() {}
            continue;
        }

        // Sequential, and every `configure`: answered before the next read.
        let answered = answer(&*agent, &request, &answers).await;
        request.recycle(&mut spare);
        match answered {
            Ok(Answered {
                multiplex: accepted,
                refused,
            }) => {
                if refused {
                    break Some("configuration refused".to_owned());
                }
                if configure {
                    multiplex = accepted;
                }
            }
            Err(reason) => break Some(reason),
        }
    };

    match &closing {
        Some(reason) => {
            warn!(%reason, "closing the connection");
            // Answers for a connection being closed are of no use to anyone.
            in_flight.abort_all();
        }
        None => debug!("connection ending; finishing requests in flight"),
    }
    // Every answer in flight is written before the socket is shut.
    tokio::select! {
        _ = abort.cancelled() => in_flight.abort_all(),
        _ = async { while in_flight.join_next().await.is_some() {} } => {}
    }
    tokio::select! {
        // A peer that stopped reading would keep it blocked for ever.
        _ = abort.cancelled() => {}
        done = answers.shutdown() => {
            if let Err(error) = done {
                debug!(%error, "answers could not all be written");
            }
        }
    }
    debug!("connection closed");
}

/// Runs the request's hook and queues the answer, its `id` echoed.
/// `Err` is why the connection has to close.
async fn answer<A: Agent>(
    agent: &A,
    request: &AgentRequest,
    answers: &SharedWriter<WriteHalf>,
) -> Result<Answered, String> {
    let event = request.event.event_type();
    let dispatched = dispatch(agent, request, Transport::Unix)
        .await
        .map_err(|e| {
            error!(error = %e, "agent failure");
            // There is no error frame: closing is how the proxy learns, at
            // once, that this call failed.
            e.to_string()
        })?;
    let mut response = dispatched.response;
    response.id = request.id;
    // Serialized straight into the queue of frames to write.
    answers
        .queue_response(&response)
        .map_err(|e| format!("the answer to {event} cannot be sent: {e}"))?;
    answers
        .write_queued()
        .await
        .map_err(|e| format!("the answer to {event} cannot be written: {e}"))?;
    Ok(Answered {
        multiplex: dispatched.multiplex,
        refused: dispatched.refused,
    })
}
