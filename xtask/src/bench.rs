//! `cargo xtask bench ...`: installs what a benchmark compares against,
//! builds it in release mode and runs it, keeping a copy of the tables it
//! prints under target/bench/.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::{build_ebpf, cargo, is_root, prereq, root, run as run_command, step};

#[derive(Subcommand)]
pub enum Bench {
    /// XDP fast path against xdp-filter, nftables and iptables: ns per
    /// packet (BPF_PROG_TEST_RUN) at 1k/100k/1M entries, denylist load time,
    /// `deny add` to first drop, CPU per dropped packet under a flood.
    /// Needs root; prints SKIPPED otherwise.
    Xdp {
        /// Extra arguments for `sentinel-bench xdp`, after `--` (e.g.
        /// `-- --quick`, `-- --sections 1,2`; `-- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

pub fn run(which: Bench) -> Result<()> {
    match which {
        Bench::Xdp { args } => xdp(&args),
    }
}

fn xdp(args: &[String]) -> Result<()> {
    if !is_root() {
        // Loading XDP programs, creating namespaces and firewall rules all
        // need root; a benchmark that cannot run says so and is not a
        // failure.
        println!("SKIPPED: bench xdp needs root");
        return Ok(());
    }
    step("Debian packages for bench xdp");
    prereq::ensure(prereq::BENCH_XDP_PACKAGES)?;
    let object = build_ebpf()?;
    step("building sentinel and sentinel-bench (release)");
    run_command(cargo(&object).args([
        "build",
        "--release",
        "-p",
        "sentinel-user",
        "-p",
        "sentinel-bench",
    ]))?;
    let release = root().join("target/release");
    let bench = release.join("sentinel-bench");
    let out_dir = root().join("target/bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let out_path = out_dir.join("xdp.md");
    let mut copy = fs::File::create(&out_path)
        .with_context(|| format!("cannot create {}", out_path.display()))?;
    let mut shown = vec!["cargo xtask bench xdp".to_owned()];
    if !args.is_empty() {
        shown.push("--".to_owned());
        shown.extend(args.iter().cloned());
    }
    step(&format!(
        "running {} xdp (tables also written to {})",
        bench.display(),
        out_path.display()
    ));
    let mut child = Command::new(&bench)
        .arg("xdp")
        .arg("--sentinel-bin")
        .arg(release.join("sentinel"))
        .args(args)
        .env("SENTINEL_BENCH_COMMAND", shown.join(" "))
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bench.display()))?;
    if let Some(stdout) = child.stdout.take() {
        let mut terminal = std::io::stdout().lock();
        for line in BufReader::new(stdout).lines() {
            let line = line.context("cannot read the benchmark's output")?;
            writeln!(terminal, "{line}")?;
            terminal.flush()?;
            writeln!(copy, "{line}")?;
        }
    }
    let status = child.wait().context("cannot wait for the benchmark")?;
    if !status.success() {
        bail!(
            "sentinel-bench xdp failed with {status} (partial tables in {})",
            out_path.display()
        );
    }
    Ok(())
}
