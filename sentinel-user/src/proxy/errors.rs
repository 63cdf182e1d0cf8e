//! Every way the proxy can fail a request, and the one place where a
//! failure becomes an HTTP status.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::{ProxyBody, body::BoxError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("upstream '{upstream}' has no healthy target")]
    NoHealthyTarget { upstream: String },
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: BoxError,
    },
    #[error("{target} did not answer within {after_ms} ms")]
    Timeout { target: String, after_ms: u128 },
    #[error("{target} failed: {source}")]
    Upstream {
        target: String,
        #[source]
        source: BoxError,
    },
    #[error("request body is over the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the client sent no body bytes for {after_ms} ms")]
    ClientTimeout { after_ms: u128 },
    #[error("request head is over the limit of {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
}

/// An error and its causes on one line, for the log: hyper's client errors
/// say "client error (Connect)" and keep the reason in their sources.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            // No route: nothing here serves this request.
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            // Every target is out (health checks or ejection): the service
            // is unavailable, not broken.
            ProxyError::NoHealthyTarget { .. } => StatusCode::SERVICE_UNAVAILABLE,
            // The upstream could not be reached or answered with something
            // that is not HTTP: a bad gateway.
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            // The upstream was reached but did not answer in time.
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // The client stopped sending its body: its request timed out.
            ProxyError::ClientTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// The response the client gets: the status and its reason as plain
    /// text. Details stay in the log; the client learns nothing about the
    /// upstreams.
    pub fn response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let text = format!(
            "{} {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let mut response = Response::new(
            Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(
            self,
            ProxyError::BadRequest { .. }
                | ProxyError::BodyTooLarge { .. }
                | ProxyError::ClientTimeout { .. }
                | ProxyError::HeadTooLarge { .. }
        ) {
            // The rest of what the client sent cannot be trusted to frame a
            // next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
