//! One event to the hook that handles it, whatever the transport.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;
use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, Audit, ConfigureEvent, Decision, Event, EventType, extensions,
};
use tracing::{info, warn};

use crate::{Agent, VerdictError};

/// Reason code of a refused configuration.
pub(crate) const CONFIGURE_REFUSED: &str = "configure_refused";

/// Which transport an event came on: only the Unix socket multiplexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Unix,
    Grpc,
    Http,
}

/// A hook's answer, checked.
#[derive(Debug)]
pub(crate) struct Dispatched {
    pub response: AgentResponse,
    /// The event was a `configure` whose answer accepted `multiplex`.
    pub multiplex: bool,
    /// The event was a `configure` the agent refused.
    pub refused: bool,
}

/// A hook failed to answer; the transport reports it as an agent failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DispatchError {
    #[error("the {event} hook answered something invalid: {source}")]
    Verdict {
        event: EventType,
        #[source]
        source: VerdictError,
    },
    #[error("the {event} hook panicked")]
    Panicked { event: EventType },
}

/// Runs the hook for `request` and checks its answer. A panic in the hook
/// is caught here so that it fails this event only.
pub(crate) async fn dispatch<A: Agent + ?Sized>(
    agent: &A,
    request: &AgentRequest,
    transport: Transport,
) -> Result<Dispatched, DispatchError> {
    let event = request.event.event_type();
    let hook = async {
        match &request.event {
            Event::Configure(c) => Ok(configure(agent, c, transport).await),
            Event::RequestHeaders(e) => Err(agent.on_request_headers(e).await),
            Event::RequestBodyChunk(e) => Err(agent.on_request_body_chunk(e).await),
            Event::ResponseHeaders(e) => Err(agent.on_response_headers(e).await),
            Event::ResponseBodyChunk(e) => Err(agent.on_response_body_chunk(e).await),
            Event::RequestComplete(e) => Err(agent.on_request_complete(e).await),
            Event::WebsocketFrame(e) => Err(agent.on_websocket_frame(e).await),
            Event::GuardrailInspect(e) => Err(agent.on_guardrail_inspect(e).await),
        }
    };
    // The hook only borrows the agent and the request; if it unwinds, the
    // next event sees them as the hook left them, which is what a lock-free
    // handler would see after an early return.
    let outcome = AssertUnwindSafe(hook)
        .catch_unwind()
        .await
        .map_err(|_| DispatchError::Panicked { event })?;
    match outcome {
        Ok(configured) => Ok(configured),
        Err(verdict) => Ok(Dispatched {
            response: verdict
                .build()
                .map_err(|source| DispatchError::Verdict { event, source })?,
            multiplex: false,
            refused: false,
        }),
    }
}

async fn configure<A: Agent + ?Sized>(
    agent: &A,
    event: &ConfigureEvent,
    transport: Transport,
) -> Dispatched {
    match agent.on_configure(event).await {
        Ok(()) => {
            let offered = |name: &str| event.extensions.iter().any(|e| e == name);
            let mut accepted = Vec::new();
            let multiplex = transport == Transport::Unix && offered(extensions::MULTIPLEX);
            if multiplex {
                accepted.push(extensions::MULTIPLEX.to_owned());
            }
            for name in agent.extensions() {
                if *name != extensions::MULTIPLEX
                    && offered(name)
                    && !accepted.iter().any(|a| a == name)
                {
                    accepted.push((*name).to_owned());
                }
            }
            info!(
                agent = agent.name(),
                agent_id = %event.agent_id,
                extensions = ?accepted,
                "configured"
            );
            Dispatched {
                response: AgentResponse {
                    extensions: accepted,
                    ..AgentResponse::allow()
                },
                multiplex,
                refused: false,
            }
        }
        Err(e) => {
            warn!(
                agent = agent.name(),
                agent_id = %event.agent_id,
                reason = %e.reason,
                "configuration refused"
            );
            Dispatched {
                response: refusal(&e.reason),
                multiplex: false,
                refused: true,
            }
        }
    }
}

/// The answer to a refused `configure`.
pub(crate) fn refusal(reason: &str) -> AgentResponse {
    AgentResponse {
        audit: Some(Audit {
            reason_codes: vec![CONFIGURE_REFUSED.to_owned()],
            ..Audit::default()
        }),
        ..AgentResponse::decide(Decision::Block {
            status: 500,
            body: Some(reason.to_owned()),
            headers: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use sentinel_agent_protocol::{RequestHeadersEvent, WebsocketFrameEvent, WebsocketOpcode};

    use super::*;
    use crate::{ConfigureError, Verdict};

    struct Probe {
        configured: AtomicUsize,
    }

    #[async_trait]
    impl Agent for Probe {
        fn extensions(&self) -> &[&str] {
            &[
                extensions::KERNEL_PUSH,
                extensions::MULTIPLEX,
                "not-offered",
            ]
        }

        async fn on_configure(&self, event: &ConfigureEvent) -> Result<(), ConfigureError> {
            self.configured.fetch_add(1, Ordering::SeqCst);
            if event.config["refuse"] == true {
                return Err(ConfigureError::new("refuse is set"));
            }
            Ok(())
        }

        async fn on_request_headers(&self, event: &RequestHeadersEvent) -> Verdict {
            match event.uri.as_str() {
                "/panic" => panic!("hook panics on purpose"),
                "/bad" => Verdict::block(42),
                _ => Verdict::allow().set_request_header("x-seen", &event.uri),
            }
        }
    }

    fn probe() -> Probe {
        Probe {
            configured: AtomicUsize::new(0),
        }
    }

    fn configure_request(config: serde_json::Value, offered: &[&str]) -> AgentRequest {
        AgentRequest::new(Event::Configure(ConfigureEvent {
            agent_id: "probe".into(),
            config,
            extensions: offered.iter().map(|s| s.to_string()).collect(),
            kernel_push: None,
        }))
    }

    fn headers(uri: &str) -> AgentRequest {
        AgentRequest::new(Event::RequestHeaders(RequestHeadersEvent {
            uri: uri.into(),
            ..RequestHeadersEvent::default()
        }))
    }

    #[tokio::test]
    async fn configure_accepts_only_what_was_offered() {
        let agent = probe();
        let offered = [extensions::MULTIPLEX, extensions::KERNEL_PUSH, "other"];
        let d = dispatch(
            &agent,
            &configure_request(serde_json::json!({}), &offered),
            Transport::Unix,
        )
        .await
        .unwrap();
        assert!(d.multiplex && !d.refused);
        assert_eq!(
            d.response.extensions,
            [extensions::MULTIPLEX, extensions::KERNEL_PUSH]
        );
        assert_eq!(d.response.decision, Decision::Allow);

        // Multiplexing means nothing on gRPC or HTTP, whatever is offered.
        for transport in [Transport::Grpc, Transport::Http] {
            let d = dispatch(
                &agent,
                &configure_request(serde_json::json!({}), &offered),
                transport,
            )
            .await
            .unwrap();
            assert!(!d.multiplex);
            assert_eq!(d.response.extensions, [extensions::KERNEL_PUSH]);
        }

        let d = dispatch(
            &agent,
            &configure_request(serde_json::Value::Null, &[]),
            Transport::Unix,
        )
        .await
        .unwrap();
        assert!(!d.multiplex);
        assert!(d.response.extensions.is_empty());
        assert_eq!(agent.configured.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_refused_configure_is_a_block_naming_the_reason() {
        let d = dispatch(
            &probe(),
            &configure_request(
                serde_json::json!({"refuse": true}),
                &[extensions::MULTIPLEX],
            ),
            Transport::Unix,
        )
        .await
        .unwrap();
        assert!(d.refused && !d.multiplex);
        assert!(d.response.extensions.is_empty());
        assert_eq!(
            d.response.decision,
            Decision::Block {
                status: 500,
                body: Some("refuse is set".into()),
                headers: Default::default()
            }
        );
        assert_eq!(d.response.audit.unwrap().reason_codes, [CONFIGURE_REFUSED]);
    }

    #[tokio::test]
    async fn events_reach_their_hook_and_defaults_allow() {
        let agent = probe();
        let d = dispatch(&agent, &headers("/x"), Transport::Http)
            .await
            .unwrap();
        assert_eq!(
            d.response.request_headers,
            [sentinel_agent_protocol::HeaderOp::Set {
                name: "x-seen".into(),
                value: "/x".into()
            }]
        );
        let frame = AgentRequest::new(Event::WebsocketFrame(WebsocketFrameEvent {
            correlation_id: "c".into(),
            opcode: WebsocketOpcode::Text,
            data: vec![],
            client_to_server: true,
            frame_index: 0,
            fin: true,
        }));
        let d = dispatch(&agent, &frame, Transport::Grpc).await.unwrap();
        assert_eq!(d.response, AgentResponse::allow());
    }

    #[tokio::test]
    async fn panics_and_invalid_answers_fail_the_event_only() {
        let agent = probe();
        assert!(matches!(
            dispatch(&agent, &headers("/panic"), Transport::Unix).await,
            Err(DispatchError::Panicked {
                event: EventType::RequestHeaders
            })
        ));
        assert!(matches!(
            dispatch(&agent, &headers("/bad"), Transport::Unix).await,
            Err(DispatchError::Verdict {
                event: EventType::RequestHeaders,
                ..
            })
        ));
        // The agent still answers afterwards.
        assert!(
            dispatch(&agent, &headers("/ok"), Transport::Unix)
                .await
                .is_ok()
        );
    }
}
