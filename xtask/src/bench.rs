//! Benchmarks (filled in below).

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// XDP cost per packet against xdp-filter, load time, deny-to-drop latency.
    Xdp,
}

pub fn run(which: Bench) -> Result<()> {
    match which {
        Bench::Xdp => anyhow::bail!("not yet"),
    }
}
