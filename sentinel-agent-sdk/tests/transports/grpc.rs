//! The gRPC transport, through tonic's generated client.

use sentinel_agent_sdk::{
    AgentRequest, AgentResponse, Decision, Event, extensions,
    protocol::grpc::pb::{self, agent_processor_client::AgentProcessorClient},
};
use serde_json::json;
use tonic::{Code, transport::Channel};

use crate::support::{Serve, configure_event, headers_event, start, x_uri};

fn grpc() -> Serve {
    Serve {
        grpc: true,
        ..Serve::default()
    }
}

async fn client(addr: std::net::SocketAddr) -> AgentProcessorClient<Channel> {
    AgentProcessorClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

pub async fn call(
    client: &mut AgentProcessorClient<Channel>,
    request: &AgentRequest,
) -> Result<AgentResponse, tonic::Status> {
    let answer = client
        .process_event(pb::AgentRequest::from(request))
        .await?
        .into_inner();
    Ok(AgentResponse::try_from(answer).expect("the agent's answer does not convert"))
}

#[tokio::test]
async fn events_round_trip() {
    let server = start(grpc()).await;
    let mut client = client(server.grpc.unwrap()).await;

    // Multiplexing is a Unix-socket matter: not accepted here.
    let answer = call(
        &mut client,
        &configure_event(&[extensions::MULTIPLEX], json!({"k": [1, 2]})),
    )
    .await
    .unwrap();
    assert_eq!(answer.decision, Decision::Allow);
    assert!(answer.extensions.is_empty());

    let answer = call(&mut client, &headers_event("/grpc")).await.unwrap();
    assert_eq!(x_uri(&answer), Some("/grpc"));

    let answer = call(&mut client, &headers_event("/block")).await.unwrap();
    assert_eq!(
        answer.decision,
        Decision::Block {
            status: 403,
            body: Some("no".into()),
            headers: Default::default()
        }
    );

    let chunk = AgentRequest::new(Event::ResponseBodyChunk(
        sentinel_agent_sdk::BodyChunkEvent {
            correlation_id: "c".into(),
            data: vec![0, 1, 2, 255],
            is_last: true,
            ..Default::default()
        },
    ));
    let answer = call(&mut client, &chunk).await.unwrap();
    // The default hook: allow, untouched.
    assert_eq!(answer, AgentResponse::allow());
    server.stop().await;
}

#[tokio::test]
async fn concurrent_calls_share_one_connection() {
    let server = start(grpc()).await;
    let client = client(server.grpc.unwrap()).await;
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let uri = format!("/sleep/{}", 200 - i * 5);
                let answer = call(&mut client, &headers_event(&uri)).await.unwrap();
                assert_eq!(x_uri(&answer), Some(uri.as_str()));
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    let most = server
        .agent
        .most_at_once
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(most >= 8, "only {most} calls ran at once");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument() {
    let server = start(grpc()).await;
    let mut client = client(server.grpc.unwrap()).await;
    let mut wrong_version = pb::AgentRequest::from(&headers_event("/x"));
    wrong_version.version = 2;
    let no_event = pb::AgentRequest {
        version: 1,
        event_type: pb::EventType::RequestHeaders as i32,
        event: None,
    };
    let mut bad_opcode = pb::AgentRequest::from(&AgentRequest::new(Event::WebsocketFrame(
        sentinel_agent_sdk::WebsocketFrameEvent {
            correlation_id: "c".into(),
            opcode: sentinel_agent_sdk::WebsocketOpcode::Text,
            data: vec![],
            client_to_server: true,
            frame_index: 0,
            fin: true,
        },
    )));
    if let Some(pb::agent_request::Event::WebsocketFrame(f)) = &mut bad_opcode.event {
        f.opcode = 3;
    }
    for (request, why) in [
        (wrong_version, "version 2"),
        (no_event, "without an event"),
        (bad_opcode, "opcode 3"),
    ] {
        let status = client.process_event(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(why), "{}", status.message());
    }
    // Still serving.
    assert!(call(&mut client, &headers_event("/ok")).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn a_failing_hook_is_internal() {
    let server = start(grpc()).await;
    let mut client = client(server.grpc.unwrap()).await;
    for (uri, why) in [("/panic", "panicked"), ("/invalid", "200-599")] {
        let status = call(&mut client, &headers_event(uri)).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains(why), "{}", status.message());
    }
    assert!(call(&mut client, &headers_event("/ok")).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn a_refused_configuration_is_a_block_answer() {
    let server = start(grpc()).await;
    let mut client = client(server.grpc.unwrap()).await;
    let answer = call(
        &mut client,
        &configure_event(&[], json!({"refuse": "no thanks"})),
    )
    .await
    .unwrap();
    assert_eq!(
        answer.decision,
        Decision::Block {
            status: 500,
            body: Some("no thanks".into()),
            headers: Default::default()
        }
    );
    server.stop().await;
}
