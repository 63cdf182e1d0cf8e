//! The handler trait an agent implements.

use async_trait::async_trait;
use sentinel_agent_protocol::{
    BodyChunkEvent, ConfigureEvent, GuardrailInspectEvent, RequestCompleteEvent,
    RequestHeadersEvent, ResponseHeadersEvent, WebsocketFrameEvent,
};

use crate::Verdict;

/// Why an agent refuses the configuration the proxy sent.
///
/// The refusal travels as the answer to `configure`: a `block` with status
/// 500, the reason as its body and the reason code `configure_refused`.
/// On a Unix socket the connection is closed after that answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration refused: {reason}")]
pub struct ConfigureError {
    pub reason: String,
}

impl ConfigureError {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// An agent: one hook per event of the protocol.
///
/// Every hook has a default that lets the request through unchanged (and
/// accepts any configuration), so an agent implements only the events it
/// subscribes to. Hooks of one agent run concurrently — for several
/// connections, and for several requests of one multiplexed connection —
/// so shared state needs its own synchronisation.
///
/// A hook that panics, or whose [`Verdict`] does not [build](Verdict::build),
/// fails that event: the gRPC transport answers `INTERNAL`, HTTP answers
/// 500, and the Unix socket, which has no error frame, closes the
/// connection. The proxy then applies the agent's `failure-mode`.
#[async_trait]
pub trait Agent: Send + Sync + 'static {
    /// A name for logs.
    fn name(&self) -> &str {
        "agent"
    }

    /// Extensions (beyond `multiplex`, which the server handles itself)
    /// this agent accepts when the proxy offers them, e.g.
    /// [`extensions::KERNEL_PUSH`](crate::extensions::KERNEL_PUSH).
    fn extensions(&self) -> &[&str] {
        &[]
    }

    /// The `configure` event: the agent's name and `config { ... }` block
    /// as the proxy knows them. Called once per Unix-socket connection, and
    /// for each `configure` on gRPC and HTTP. `Err` refuses it.
    async fn on_configure(&self, _event: &ConfigureEvent) -> Result<(), ConfigureError> {
        Ok(())
    }

    async fn on_request_headers(&self, _event: &RequestHeadersEvent) -> Verdict {
        Verdict::allow()
    }

    async fn on_request_body_chunk(&self, _event: &BodyChunkEvent) -> Verdict {
        Verdict::allow()
    }

    async fn on_response_headers(&self, _event: &ResponseHeadersEvent) -> Verdict {
        Verdict::allow()
    }

    async fn on_response_body_chunk(&self, _event: &BodyChunkEvent) -> Verdict {
        Verdict::allow()
    }

    /// The `log` subscription: the request is over, so only the audit part
    /// of the answer matters.
    async fn on_request_complete(&self, _event: &RequestCompleteEvent) -> Verdict {
        Verdict::allow()
    }

    async fn on_websocket_frame(&self, _event: &WebsocketFrameEvent) -> Verdict {
        Verdict::allow()
    }

    async fn on_guardrail_inspect(&self, _event: &GuardrailInspectEvent) -> Verdict {
        Verdict::allow()
    }
}

/// An agent behind a shared pointer is an agent, so one instance can be
/// served and inspected (in tests, say) at the same time.
#[async_trait]
impl<A: Agent + ?Sized> Agent for std::sync::Arc<A> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn extensions(&self) -> &[&str] {
        (**self).extensions()
    }

    async fn on_configure(&self, event: &ConfigureEvent) -> Result<(), ConfigureError> {
        (**self).on_configure(event).await
    }

    async fn on_request_headers(&self, event: &RequestHeadersEvent) -> Verdict {
        (**self).on_request_headers(event).await
    }

    async fn on_request_body_chunk(&self, event: &BodyChunkEvent) -> Verdict {
        (**self).on_request_body_chunk(event).await
    }

    async fn on_response_headers(&self, event: &ResponseHeadersEvent) -> Verdict {
        (**self).on_response_headers(event).await
    }

    async fn on_response_body_chunk(&self, event: &BodyChunkEvent) -> Verdict {
        (**self).on_response_body_chunk(event).await
    }

    async fn on_request_complete(&self, event: &RequestCompleteEvent) -> Verdict {
        (**self).on_request_complete(event).await
    }

    async fn on_websocket_frame(&self, event: &WebsocketFrameEvent) -> Verdict {
        (**self).on_websocket_frame(event).await
    }

    async fn on_guardrail_inspect(&self, event: &GuardrailInspectEvent) -> Verdict {
        (**self).on_guardrail_inspect(event).await
    }
}
