//! The HTTP transport: the JSON envelope as a POST body (any path), with
//! `X-Sentinel-Protocol-Version: 1`, answered with the JSON response.
//! HTTP/1.1 and HTTP/2 (by prior knowledge, or by ALPN under TLS).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, MAX_MESSAGE_SIZE, PROTOCOL_VERSION, ProtocolError, VERSION_HEADER,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, error, info_span};

use super::tcp::Accepted;
use crate::{
    Agent,
    dispatch::{DispatchError, Transport, dispatch},
};

/// A request head must arrive within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) async fn serve<A: Agent>(
    mut conns: mpsc::Receiver<Accepted>,
    agent: Arc<A>,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = conns.recv() => accepted,
        };
        let Some(accepted) = accepted else { break };
        let span = info_span!("http", peer = %accepted.peer);
        tracker.spawn(
            connection(accepted, agent.clone(), stop.clone(), abort.clone()).instrument(span),
        );
    }
}

async fn connection<A: Agent>(
    accepted: Accepted,
    agent: Arc<A>,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let peer = accepted.peer;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let service = service_fn(move |request| respond(request, agent.clone(), peer));
    let conn = builder.serve_connection(TokioIo::new(accepted), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    debug!(%error, "connection ended with an error");
                }
                break;
            }
            _ = stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = abort.cancelled() => break,
        }
    }
}

/// Why a request got no answer from the agent.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("method {method} is not allowed: POST the event")]
    Method { method: Method },
    #[error("{VERSION_HEADER} must be {PROTOCOL_VERSION}, got {got}")]
    Version { got: String },
    #[error("body over the limit of {MAX_MESSAGE_SIZE} bytes")]
    TooLarge,
    #[error("cannot read the body: {reason}")]
    Body { reason: String },
    #[error("{0}")]
    Request(#[from] ProtocolError),
    #[error("{0}")]
    Agent(#[from] DispatchError),
}

impl HttpError {
    /// The one place these errors become statuses.
    fn status(&self) -> StatusCode {
        match self {
            HttpError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            HttpError::Version { .. } | HttpError::Body { .. } | HttpError::Request(_) => {
                StatusCode::BAD_REQUEST
            }
            HttpError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            // The agent failed: the proxy applies its failure mode.
            HttpError::Agent(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        let mut response = json_response(self.status(), body.into_bytes());
        if let HttpError::Method { .. } = self {
            response
                .headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        }
        response
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn respond<A: Agent>(
    request: Request<Incoming>,
    agent: Arc<A>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match answer(request, &*agent).await {
        Ok(response) => json_response(StatusCode::OK, response.to_json()),
        Err(e) => {
            match &e {
                HttpError::Agent(_) => error!(%peer, error = %e, "agent failure"),
                _ => debug!(%peer, error = %e, "HTTP request refused"),
            }
            e.into_response()
        }
    })
}

async fn answer<A: Agent>(
    request: Request<Incoming>,
    agent: &A,
) -> Result<AgentResponse, HttpError> {
    if request.method() != Method::POST {
        return Err(HttpError::Method {
            method: request.method().clone(),
        });
    }
    let version = request.headers().get(VERSION_HEADER);
    let version_ok = version
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().parse::<u32>() == Ok(PROTOCOL_VERSION));
    if !version_ok {
        return Err(HttpError::Version {
            got: match version {
                None => "no header".to_owned(),
                Some(v) => format!("{:?}", String::from_utf8_lossy(v.as_bytes())),
            },
        });
    }
    // Refuse what the sender says is too large before reading any of it.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_MESSAGE_SIZE as u64) {
        return Err(HttpError::TooLarge);
    }
    let body = Limited::new(request.into_body(), MAX_MESSAGE_SIZE)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                HttpError::TooLarge
            } else {
                HttpError::Body {
                    reason: e.to_string(),
                }
            }
        })?
        .to_bytes();
    let request = AgentRequest::from_json(&body)?;
    debug!(event = %request.event.event_type(), "HTTP request");
    Ok(dispatch(agent, &request, Transport::Http).await?.response)
}
