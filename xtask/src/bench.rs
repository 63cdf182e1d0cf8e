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
    /// The reverse proxy against nginx (one worker each, keep-alive to the
    /// same upstream): wrk requests per second and p50/p99 latency for a
    /// small and a 64 KiB response, and memory per idle keep-alive
    /// connection. Needs root (the daemon loads BPF); prints SKIPPED
    /// otherwise.
    Proxy {
        /// Extra arguments for `sentinel-bench proxy`, after `--` (e.g.
        /// `-- --quick`; `-- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// What an agent adds to a request: latency at a fixed rate through
    /// the reference echo agent over a Unix socket, gRPC and HTTP, against
    /// a raw Unix-socket ping-pong (the floor), and wrk throughput with and
    /// without the agent. Needs root; prints SKIPPED otherwise.
    Agents {
        /// Extra arguments for `sentinel-bench agents`, after `--` (e.g.
        /// `-- --quick`; `-- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// What each runtime-profile mode costs a request: wrk throughput and
    /// latency, and latency at a fixed rate, for off, lite, monitor and
    /// protection side by side. Needs root; prints SKIPPED otherwise.
    Profile {
        /// Extra arguments for `sentinel-bench profile`, after `--` (e.g.
        /// `-- --quick`; `-- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// New TCP connections through sk_lookup steering against a plain
    /// bound listener: connections per second and connect p50/p99, side by
    /// side, the daemon and client in a network namespace of their own.
    /// Needs root; prints SKIPPED otherwise.
    Steering {
        /// Extra arguments for `sentinel-bench steering`, after `--` (e.g.
        /// `-- --quick`; `-- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

pub fn run(which: Bench) -> Result<()> {
    match which {
        Bench::Xdp { args } => bench("xdp", prereq::BENCH_XDP_PACKAGES, &args),
        Bench::Proxy { args } => bench("proxy", prereq::BENCH_PROXY_PACKAGES, &args),
        Bench::Agents { args } => bench("agents", prereq::BENCH_PROXY_PACKAGES, &args),
        Bench::Profile { args } => bench("profile", prereq::BENCH_PROXY_PACKAGES, &args),
        Bench::Steering { args } => bench("steering", prereq::BENCH_PROXY_PACKAGES, &args),
    }
}

fn bench(name: &str, packages: &[(&str, &str)], args: &[String]) -> Result<()> {
    if !is_root() {
        // Loading XDP programs, creating namespaces and firewall rules all
        // need root; a benchmark that cannot run says so and is not a
        // failure.
        println!("SKIPPED: bench {name} needs root");
        return Ok(());
    }
    step(&format!("Debian packages for bench {name}"));
    prereq::ensure(packages)?;
    let object = build_ebpf()?;
    step("building sentinel and sentinel-bench (release)");
    run_command(cargo(&object).args([
        "build",
        "--release",
        "-p",
        "sentinel-user",
        "-p",
        "sentinel-bench",
        "-p",
        "sentinel-agents",
    ]))?;
    let release = root().join("target/release");
    let bench = release.join("sentinel-bench");
    let out_dir = root().join("target/bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let out_path = out_dir.join(format!("{name}.md"));
    let mut copy = fs::File::create(&out_path)
        .with_context(|| format!("cannot create {}", out_path.display()))?;
    let mut shown = vec![format!("cargo xtask bench {name}")];
    if !args.is_empty() {
        shown.push("--".to_owned());
        shown.extend(args.iter().cloned());
    }
    step(&format!(
        "running {} {name} (tables also written to {})",
        bench.display(),
        out_path.display()
    ));
    let mut child = Command::new(&bench)
        .arg(name)
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
            "sentinel-bench {name} failed with {status} (partial tables in {})",
            out_path.display()
        );
    }
    Ok(())
}
