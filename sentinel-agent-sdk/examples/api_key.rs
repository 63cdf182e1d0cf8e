//! A complete small agent: requests under a protected prefix need an API
//! key; the rest pass, marked with the route they took. docs/agent-sdk.md
//! walks through it.
//!
//! cargo run -p sentinel-agent-sdk --example api_key -- \
//!     --socket /tmp/api-key.sock --key s3cret

use std::sync::RwLock;

use clap::Parser;
use sentinel_agent_sdk::{
    Agent, ConfigureError, ConfigureEvent, RequestExt, RequestHeadersEvent, ServerArgs, Verdict,
    async_trait,
};

/// Requests under the protected prefix need X-Api-Key.
#[derive(Parser)]
#[command(name = "api-key-agent")]
struct Cli {
    /// --socket, --grpc, --http, TLS and logging: the SDK's flags.
    #[command(flatten)]
    server: ServerArgs,
    /// The key clients must send in X-Api-Key.
    #[arg(long, env = "API_KEY")]
    key: String,
}

struct ApiKey {
    key: String,
    /// From the proxy's `config { protected "/api/" }`.
    protected: RwLock<String>,
}

#[async_trait]
impl Agent for ApiKey {
    fn name(&self) -> &str {
        "api-key"
    }

    async fn on_configure(&self, event: &ConfigureEvent) -> Result<(), ConfigureError> {
        let protected = match event.config.get("protected") {
            None => "/".to_owned(),
            Some(serde_json::Value::String(p)) if p.starts_with('/') => p.clone(),
            Some(other) => {
                return Err(ConfigureError::new(format!(
                    "protected must be a path such as \"/api/\", not {other}"
                )));
            }
        };
        *self.protected.write().unwrap_or_else(|p| p.into_inner()) = protected;
        Ok(())
    }

    async fn on_request_headers(&self, event: &RequestHeadersEvent) -> Verdict {
        let protected = self
            .protected
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !event.path().starts_with(&protected) {
            return Verdict::allow();
        }
        match event.header("x-api-key") {
            Some(key) if key == self.key => Verdict::allow()
                // The upstream never sees the key itself.
                .remove_request_header("x-api-key")
                .set_request_header("x-authenticated", "api-key")
                .audit_tag("authenticated"),
            Some(_) => Verdict::block(403)
                .with_body("bad API key\n")
                .audit_tag("bad-key")
                .rule_id("api-key:mismatch"),
            None => Verdict::block(401)
                .with_body("API key required\n")
                .with_header("WWW-Authenticate", "ApiKey")
                .rule_id("api-key:missing"),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), sentinel_agent_sdk::ServerError> {
    let cli = Cli::parse();
    cli.server.init_tracing();
    let agent = ApiKey {
        key: cli.key,
        protected: RwLock::new("/".to_owned()),
    };
    sentinel_agent_sdk::run(agent, &cli.server).await
}
