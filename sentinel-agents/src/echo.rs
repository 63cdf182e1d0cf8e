//! The echo agent: proof that requests pass through the agent.

use sentinel_agent_sdk::{Agent, RequestHeadersEvent, Verdict, async_trait};

/// The header the echo agent sets on every request.
pub const HEADER: &str = "X-Agent-Processed";

/// Sets `X-Agent-Processed: true` on every request it sees
/// (`request_headers`), and lets everything else through.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoAgent;

#[async_trait]
impl Agent for EchoAgent {
    fn name(&self) -> &str {
        "echo"
    }

    async fn on_request_headers(&self, _event: &RequestHeadersEvent) -> Verdict {
        // `set`, not `add`: a client that sends the header itself must not
        // make the upstream see a second value it chose.
        Verdict::allow().set_request_header(HEADER, "true")
    }
}

#[cfg(test)]
mod tests {
    use sentinel_agent_sdk::{BodyChunkEvent, Decision, HeaderOp, ResponseHeadersEvent};

    use super::*;

    #[tokio::test]
    async fn marks_request_headers_and_nothing_else() {
        let answer = EchoAgent
            .on_request_headers(&RequestHeadersEvent::default())
            .await
            .build()
            .unwrap();
        assert_eq!(answer.decision, Decision::Allow);
        assert_eq!(
            answer.request_headers,
            [HeaderOp::Set {
                name: "X-Agent-Processed".into(),
                value: "true".into()
            }]
        );
        assert!(answer.response_headers.is_empty());

        let other = EchoAgent
            .on_response_headers(&ResponseHeadersEvent::default())
            .await
            .build()
            .unwrap();
        assert_eq!(other, sentinel_agent_sdk::AgentResponse::allow());
        let chunk = EchoAgent
            .on_request_body_chunk(&BodyChunkEvent::default())
            .await
            .build()
            .unwrap();
        assert!(chunk.body_mutation.is_none());
    }
}
