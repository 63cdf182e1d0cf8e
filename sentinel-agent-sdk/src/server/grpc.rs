//! The gRPC transport: the generated `sentinel.agent.v1.AgentProcessor`
//! service, converted to and from the protocol's JSON types so that hooks
//! see one set of types whatever the transport.

use std::sync::Arc;

use sentinel_agent_protocol::{
    AgentRequest, MAX_MESSAGE_SIZE,
    grpc::pb::{
        self,
        agent_processor_server::{AgentProcessor, AgentProcessorServer},
    },
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, error};

use super::tcp::{Accepted, PeerInfo};
use crate::{
    Agent,
    dispatch::{Transport, dispatch},
};

struct GrpcAgent<A> {
    agent: Arc<A>,
}

#[tonic::async_trait]
impl<A: Agent> AgentProcessor for GrpcAgent<A> {
    async fn process_event(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::AgentResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().map(|p| p.peer);
        let request = AgentRequest::try_from(request.into_inner()).map_err(|e| {
            debug!(?peer, error = %e, "gRPC request refused");
            Status::invalid_argument(e.to_string())
        })?;
        debug!(?peer, event = %request.event.event_type(), "gRPC request");
        match dispatch(&*self.agent, &request, Transport::Grpc).await {
            Ok(dispatched) => Ok(Response::new(pb::AgentResponse::from(&dispatched.response))),
            Err(e) => {
                error!(?peer, error = %e, "agent failure");
                Err(Status::internal(e.to_string()))
            }
        }
    }
}

/// Serves gRPC on the accepted connections until `stop`, then lets calls
/// in flight finish unless `abort` comes first.
pub(super) async fn serve<A: Agent>(
    conns: mpsc::Receiver<Accepted>,
    agent: Arc<A>,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let service = AgentProcessorServer::new(GrpcAgent { agent })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let incoming = ReceiverStream::new(conns).map(Ok::<_, std::io::Error>);
    let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
        service,
        incoming,
        stop.cancelled_owned(),
    );
    tokio::select! {
        result = server => if let Err(error) = result {
            error!(%error, "gRPC server stopped");
        },
        _ = abort.cancelled() => {}
    }
}
