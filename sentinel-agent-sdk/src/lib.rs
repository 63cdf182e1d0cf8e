//! Write Sentinel agents in Rust.
//!
//! An agent is a value implementing [`Agent`]: one async hook per event of
//! the agent protocol, each answering with a [`Verdict`] (a builder that
//! becomes the protocol's [`AgentResponse`]). [`AgentServer`] serves it on
//! any mix of the three transports at once:
//!
//! - a Unix socket (length-prefixed JSON frames, multiplexed by request id
//!   when the proxy offers it),
//! - gRPC (the `sentinel.agent.v1.AgentProcessor` service),
//! - HTTP (JSON POST with `X-Sentinel-Protocol-Version: 1`),
//!
//! the last two optionally behind TLS or mutual TLS. [`ServerArgs`] is the
//! command line every agent binary shares; [`run`] serves an agent with it
//! until SIGTERM or SIGINT.
//!
//! ```no_run
//! use clap::Parser;
//! use sentinel_agent_sdk::{Agent, RequestExt, RequestHeadersEvent, ServerArgs, Verdict};
//!
//! struct NoAdmin;
//!
//! #[async_trait::async_trait]
//! impl Agent for NoAdmin {
//!     async fn on_request_headers(&self, event: &RequestHeadersEvent) -> Verdict {
//!         if event.path().starts_with("/admin") {
//!             Verdict::block(403).with_body("forbidden").audit_tag("admin")
//!         } else {
//!             Verdict::allow()
//!         }
//!     }
//! }
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     server: ServerArgs,
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), sentinel_agent_sdk::ServerError> {
//!     let cli = Cli::parse();
//!     cli.server.init_tracing();
//!     sentinel_agent_sdk::run(NoAdmin, &cli.server).await
//! }
//! ```
//!
//! docs/agent-sdk.md is the guide; docs/agent-protocol.md the protocol.

mod agent;
mod cli;
mod dispatch;
mod request;
pub mod server;
pub mod tls;
mod verdict;

pub use agent::{Agent, ConfigureError};
pub use cli::{ServerArgs, TransportArgs, run};
pub use request::RequestExt;
pub use server::{AgentServer, BoundServer, ServerError, UnixOptions};
pub use tls::{TlsError, TlsOptions};
pub use verdict::{Verdict, VerdictError};

/// The protocol crate, for everything this crate does not re-export.
pub use sentinel_agent_protocol as protocol;
pub use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, Audit, BodyChunkEvent, ConfigureEvent, Decision, Event, EventType,
    GuardrailDetection, GuardrailInspectEvent, GuardrailResult, HeaderOp, Headers, KernelAction,
    KernelPush, KernelPushLimits, RequestCompleteEvent, RequestHeadersEvent, RequestMetadata,
    ResponseHeadersEvent, WebsocketFrameEvent, WebsocketOpcode, extensions,
};

/// The attribute macro the [`Agent`] trait is implemented with.
pub use async_trait::async_trait;
