//! `sentinel-denylist-agent`: blocks requests by path prefix and client
//! address, and asks Sentinel to drop repeat offenders in the kernel.

use anyhow::Context as _;
use clap::Parser;
use sentinel_agent_sdk::ServerArgs;
use sentinel_agents::denylist::{DenylistAgent, DenylistArgs};

/// Sentinel's denylist agent: 403 for listed path prefixes and client
/// networks; repeat offenders are denied in XDP when the proxy allows it.
#[derive(Debug, Parser)]
#[command(name = "sentinel-denylist-agent", version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    denylist: DenylistArgs,
}

// One thread: the hooks answer at once, so a second worker only adds
// hand-overs and wake-ups between threads to every call.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.server.init_tracing();
    let agent = DenylistAgent::from_args(&cli.denylist).context("denylist rules")?;
    sentinel_agent_sdk::run(agent, &cli.server).await?;
    Ok(())
}
