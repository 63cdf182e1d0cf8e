//! `sentinel-echo-agent`: sets `X-Agent-Processed: true` on every request,
//! to check that Sentinel reaches its agents.

use clap::Parser;
use sentinel_agent_sdk::ServerArgs;
use sentinel_agents::echo::EchoAgent;

/// Sentinel's echo agent: marks every request with X-Agent-Processed: true.
#[derive(Debug, Parser)]
#[command(name = "sentinel-echo-agent", version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
}

// One thread: the hooks answer at once, so a second worker only adds
// hand-overs and wake-ups between threads to every call.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.server.init_tracing();
    sentinel_agent_sdk::run(EchoAgent, &cli.server).await?;
    Ok(())
}
