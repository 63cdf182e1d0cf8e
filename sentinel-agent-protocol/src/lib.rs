//! Sentinel agent protocol, version 1.
//!
//! The proxy sends an agent one [`AgentRequest`] per lifecycle event and the
//! agent answers each with one [`AgentResponse`]. The same logical messages
//! travel three ways:
//!
//! - **Unix socket**: a 4-byte big-endian length, then that many bytes of
//!   JSON ([`frame`]); at most [`MAX_MESSAGE_SIZE`] bytes. Both sides wrap
//!   the stream in [`socket`], which the reactor wakes only to read.
//! - **gRPC**: Protocol Buffers over HTTP/2, the `sentinel.agent.v1`
//!   service in `proto/sentinel/agent/v1/agent.proto` ([`grpc`]).
//! - **HTTP**: the JSON envelope as a POST body, with
//!   `X-Sentinel-Protocol-Version: 1` ([`VERSION_HEADER`]).
//!
//! Everything beyond the seed's text is an optional extension that an agent
//! written from that text alone never sees or never needs to send:
//! multiplexing by request `id` on a Unix socket is offered in the
//! `configure` event and used only when the agent accepts it in its answer;
//! body mutations, guardrail results and kernel pushes are optional fields
//! of the response. docs/agent-protocol.md is the reference.

mod fast;
pub mod frame;
pub mod grpc;
pub mod json;
mod recycle;
pub mod socket;
mod types;

pub use types::*;

/// The protocol version this crate speaks. A message with another version
/// is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest message, in bytes, on any transport (10 MiB).
pub const MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;

/// Header of every HTTP-transport request, carrying [`PROTOCOL_VERSION`].
pub const VERSION_HEADER: &str = "X-Sentinel-Protocol-Version";

/// Extension names exchanged in the `configure` handshake.
pub mod extensions {
    /// Several requests in flight on one Unix-socket connection, each
    /// carrying an `id` that its response echoes.
    pub const MULTIPLEX: &str = "multiplex";
    /// The agent may ask for the client to be denied (or watched) in the
    /// kernel through `kernel_push`; offered only when the agent's
    /// configuration allows it.
    pub const KERNEL_PUSH: &str = "kernel_push";
}

/// Why a message could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("protocol version {got} is not supported (this side speaks {PROTOCOL_VERSION})")]
    Version { got: u32 },
    #[error("invalid message: {reason}")]
    Invalid { reason: String },
}

impl AgentRequest {
    /// Builds a request for `event` with the current protocol version.
    pub fn new(event: Event) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            id: None,
            event,
        }
    }

    /// The JSON envelope, as sent on the Unix-socket and HTTP transports.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map key is a string
        // and every value is plain data.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a JSON envelope and checks its version.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let request: AgentRequest = match std::str::from_utf8(bytes) {
            Ok(text) => serde_json::from_str(text)?,
            // The slice reader says where the bad byte is.
            Err(_) => serde_json::from_slice(bytes)?,
        };
        request.check_version()
    }

    /// [`AgentRequest::from_json`], reading a `request_headers` payload
    /// into the strings, vectors and header names of `recycled` (an
    /// earlier request's event, given back by [`AgentRequest::recycle`]),
    /// which is taken. The result is the same; what changes is that a
    /// stream of similar requests allocates next to nothing.
    pub fn from_json_recycling(
        bytes: &[u8],
        recycled: &mut Option<RequestHeadersEvent>,
    ) -> Result<Self, ProtocolError> {
        let request = match std::str::from_utf8(bytes) {
            Ok(text) => {
                if let Some(request) = fast::request(text, recycled) {
                    return request.check_version();
                }
                let mut de = serde_json::Deserializer::from_str(text);
                let request = AgentRequest::deserialize_recycling(&mut de, recycled)?;
                de.end()?;
                request
            }
            Err(_) => serde_json::from_slice(bytes)?,
        };
        request.check_version()
    }

    fn check_version(self) -> Result<Self, ProtocolError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version { got: self.version });
        }
        Ok(self)
    }
}

impl AgentResponse {
    /// An `allow` with nothing else.
    pub fn allow() -> Self {
        Self::default()
    }

    /// Answers with `decision` and nothing else.
    pub fn decide(decision: Decision) -> Self {
        Self {
            decision,
            ..Self::default()
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a JSON answer and checks its version and decision.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let response = Self::parse(bytes)?;
        response.validate()?;
        Ok(response)
    }

    /// Parses a JSON answer without [`validate`](Self::validate)'s checks.
    /// The common answer (`allow` with header operations) is read
    /// directly; anything else by serde, with the same result.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        match std::str::from_utf8(bytes) {
            // One pass over the bytes for UTF-8 rather than one per string.
            Ok(text) => match fast::response(text) {
                Some(response) => Ok(response),
                None => serde_json::from_str(text),
            },
            Err(_) => serde_json::from_slice(bytes),
        }
    }

    /// Checks what JSON's types cannot: the version, and that a decision's
    /// status is one it may carry.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version { got: self.version });
        }
        match &self.decision {
            Decision::Block { status, .. } if !(200..=599).contains(status) => {
                Err(ProtocolError::Invalid {
                    reason: format!("block status {status} is not 200-599"),
                })
            }
            Decision::Redirect { status, .. } if !matches!(status, 301 | 302 | 307 | 308) => {
                Err(ProtocolError::Invalid {
                    reason: format!("redirect status {status} is not 301, 302, 307 or 308"),
                })
            }
            Decision::Redirect { url, .. } if url.is_empty() => Err(ProtocolError::Invalid {
                reason: "redirect without a url".to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
