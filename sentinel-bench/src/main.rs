//! `sentinel-bench`: benchmark programs run by `cargo xtask bench`, each
//! printing Markdown tables side by side with the peer it is measured
//! against. Progress goes to stderr, tables to stdout.
//!
//! `sentinel-bench xdp` measures the XDP fast path:
//! 1. ns per packet through `BPF_PROG_TEST_RUN` against xdp-filter
//!    ([`testrun`]), for three kinds of entries at several counts;
//! 2. the time to load a large denylist, in-process and end to end
//!    through the daemon ([`import`]);
//! 3. the time from `sentinel deny add` to the first dropped packet on a
//!    veth pair ([`latency`]);
//! 4. CPU time per dropped packet under a trafgen flood, against
//!    xdp-filter, nftables and iptables ([`flood`]).
//!
//! `sentinel-bench proxy` measures the reverse proxy against nginx
//! ([`proxy`]); `sentinel-bench agents` what an agent adds to a request
//! ([`agents`]); `sentinel-bench profile` what each runtime-profile mode
//! costs ([`profile`]); `sentinel-bench steering` new connections through
//! sk_lookup steering against a plain bound listener ([`steering`]).
//!
//! Everything it creates (namespaces, pin directories, firewall rules,
//! xdp-filter attachments, daemons) is removed by guards when it ends, also
//! on error or Ctrl-C; leftovers of a run that was killed outright are
//! removed at the next start ([`stale`]).

mod agents;
mod bpf;
mod cpu;
mod daemon;
mod entries;
mod filters;
mod flood;
mod import;
mod latency;
mod netns;
mod profile;
mod proxy;
mod report;
mod stale;
mod steering;
mod table;
mod testrun;
mod xdp_filter;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::{entries::Kind, netns::NetNs, table::Table};

#[derive(Parser)]
#[command(
    name = "sentinel-bench",
    about = "Sentinel benchmarks, side by side with their peers"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// XDP fast path against xdp-filter, nftables and iptables (root).
    Xdp(XdpArgs),
    /// The reverse proxy against nginx: wrk throughput and latency, and
    /// memory per idle keep-alive connection (root: the daemon loads BPF).
    Proxy(ProxyArgs),
    /// What an agent adds to a request: latency at a fixed rate over each
    /// transport against a raw Unix-socket floor, and throughput (root).
    Agents(AgentsArgs),
    /// What each runtime-profile mode (off, lite, monitor, protection)
    /// costs a request: wrk throughput and latency, and latency at a fixed
    /// rate, side by side (root).
    Profile(ProfileArgs),
    /// New TCP connections through sk_lookup steering against a plain
    /// bound listener: setup rate and connect latency, side by side, in a
    /// network namespace of its own (root).
    Steering(SteeringArgs),
}

#[derive(Args, Debug)]
struct SteeringArgs {
    /// The `sentinel` binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    sentinel_bin: Option<PathBuf>,
    /// Connections per round and path.
    #[arg(long, default_value_t = 20_000)]
    connections: usize,
    /// Rounds, alternating the order (the median is reported).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Short runs: a smoke test, not a measurement.
    #[arg(long)]
    quick: bool,
}

#[derive(Args, Debug)]
struct ProfileArgs {
    /// The `sentinel` binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    sentinel_bin: Option<PathBuf>,
    /// Requests per second of the fixed-rate runs.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Requests per fixed-rate run.
    #[arg(long, default_value_t = 5_000)]
    requests: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Rounds, rotating the order (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Short runs: a smoke test, not a measurement.
    #[arg(long)]
    quick: bool,
}

#[derive(Args, Debug)]
struct AgentsArgs {
    /// The `sentinel` binary (default: next to this program); the echo
    /// agent is taken from the same directory.
    #[arg(long, value_name = "PATH")]
    sentinel_bin: Option<PathBuf>,
    /// Requests per second of the latency runs.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Requests per latency run.
    #[arg(long, default_value_t = 5_000)]
    requests: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Rounds, rotating the order (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Short runs: a smoke test, not a measurement.
    #[arg(long)]
    quick: bool,
}

#[derive(Args, Debug)]
struct ProxyArgs {
    /// The `sentinel` binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    sentinel_bin: Option<PathBuf>,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Alternating rounds per response size (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Idle keep-alive connections for the memory measurement (0: skip).
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Short runs: a smoke test, not a measurement.
    #[arg(long)]
    quick: bool,
}

#[derive(Args, Debug)]
struct XdpArgs {
    /// The `sentinel` binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    sentinel_bin: Option<PathBuf>,
    /// Entry counts for the per-packet table, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    sizes: Vec<usize>,
    /// BPF_PROG_TEST_RUN repeat count per measurement.
    #[arg(long, default_value_t = 2_000_000)]
    repeat: u32,
    /// Alternating rounds per measurement (the median is reported).
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Entries loaded in section 2, in-process and end to end through
    /// `sentinel deny import` [default: 1000000; 100000 with --quick].
    #[arg(long)]
    import_entries: Option<usize>,
    /// Repetitions of the deny-to-drop measurement.
    #[arg(long, default_value_t = 10)]
    latency_repeats: usize,
    /// Frames per flood.
    #[arg(long, default_value_t = 2_000_000)]
    flood_packets: u64,
    /// Rounds over all filters in the flood measurement.
    #[arg(long, default_value_t = 3)]
    flood_rounds: usize,
    /// Sections to run (1: per packet, 2: load time, 3: deny-to-drop,
    /// 4: flood), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    sections: Vec<u8>,
    /// Small counts everywhere: a smoke test of the whole program in about
    /// a minute, not a measurement.
    #[arg(long)]
    quick: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Fails once SIGINT or SIGTERM has arrived, so that every guard on the way
/// out runs.
pub fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn command_text(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".to_owned())
}

/// The machine and tools the numbers come from.
fn header(args: &[String]) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?", |(_, m)| m.trim());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let versions = command_text(
        "dpkg-query",
        &[
            "-W",
            "-f",
            "${Package} ${Version}, ",
            "xdp-tools",
            "libxdp1",
            "netsniff-ng",
            "nftables",
            "iptables",
        ],
    );
    format!(
        "## sentinel-bench xdp\n\n\
         - command: `{}`\n\
         - date: {}\n\
         - tree: commit {} (plus any uncommitted changes)\n\
         - machine: {model}, {cpus} CPUs, {mem_gib:.1} GiB, kernel {}\n\
         - load average at start: {}\n\
         - peers: {} ({})\n",
        args.join(" "),
        command_text("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        command_text(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "rev-parse",
                "--short",
                "HEAD"
            ]
        ),
        kernel.trim(),
        load.trim(),
        versions.trim_end_matches([',', ' ']),
        command_text("iptables", &["-V"]),
    )
}

fn print(table: &Table) {
    println!("{}", table.render());
}

/// Waits for the machine to quiet down before a section and says how busy
/// it still was.
fn settle(section: &str) {
    match cpu::settle(Duration::from_secs(30)) {
        Ok(busy) => {
            eprintln!(
                "    before {section}: {:.0}% of all CPUs busy",
                busy * 100.0
            );
            println!(
                "_Before this section the machine was {:.0}% busy (all CPUs, 300 ms window, after waiting up to 30 s for it to quiet down)._\n",
                busy * 100.0
            );
        }
        Err(e) => eprintln!("warning: cannot measure the background load: {e:#}"),
    }
}

fn xdp(mut args: XdpArgs) -> Result<bool> {
    if args.quick {
        args.sizes = vec![1_000, 10_000];
        args.repeat = 200_000;
        args.rounds = 3;
        args.latency_repeats = 3;
        args.flood_packets = 200_000;
        args.flood_rounds = 1;
    }
    // An explicit count wins over --quick's: `--quick --sections 2
    // --import-entries 1000000` measures the load target alone.
    let import_entries =
        args.import_entries
            .unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
    args.sizes.sort_unstable();
    args.sizes.dedup();
    if args.sizes.is_empty() || args.rounds == 0 || args.repeat == 0 {
        bail!("--sizes, --rounds and --repeat must not be empty or zero");
    }
    let bin = match &args.sentinel_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()
            .context("cannot locate this program")?
            .with_file_name("sentinel"),
    };
    let wants = |s: u8| args.sections.contains(&s);
    if (wants(2) || wants(3)) && !bin.exists() {
        bail!(
            "{} does not exist: build it (`cargo build --release -p sentinel-user`) or pass --sentinel-bin",
            bin.display()
        );
    }
    bpf::ensure_bpffs().context("cannot mount bpffs at /sys/fs/bpf")?;
    for line in stale::clean() {
        eprintln!("    removed a leftover of an earlier run: {line}");
    }
    // xtask passes the command its user typed.
    let argv: Vec<String> = match std::env::var("SENTINEL_BENCH_COMMAND") {
        Ok(command) => vec![command],
        Err(_) => std::env::args().collect(),
    };
    println!("{}", header(&argv));
    let started = Instant::now();
    let mut failed = false;
    let mut fail = |section: &str, error: anyhow::Error| {
        eprintln!("error: {section}: {error:#}");
        println!("**{section} FAILED:** {error:#}\n");
        failed = true;
    };

    let ns = if wants(1) || wants(3) || wants(4) {
        eprintln!("==> network namespace and veth pair");
        match NetNs::new() {
            Ok(ns) => Some(ns),
            Err(e) => {
                fail("network namespace", e);
                None
            }
        }
    } else {
        None
    };

    let mut loads = Vec::new();
    if wants(1) {
        eprintln!("==> 1. per-packet cost (BPF_PROG_TEST_RUN)");
        settle("section 1");
        let plan = testrun::Plan {
            sizes: args.sizes.clone(),
            repeat: args.repeat,
            rounds: args.rounds,
        };
        match testrun::run(&plan, ns.as_ref().map(|n| n.host_if.as_str())) {
            Ok((cells, l)) => {
                print(&report::per_packet(&cells, args.repeat, args.rounds));
                if let Some(t) = report::growth(&cells) {
                    print(&t);
                }
                if let Some(t) = report::stock_check(&cells) {
                    print(&t);
                }
                loads = l;
            }
            Err(e) => fail("section 1", e),
        }
        if interrupted().is_err() {
            return Ok(false);
        }
        match testrun::fixed_cost(&plan) {
            Ok(cells) => print(&report::fixed_cost(&cells)),
            Err(e) => fail("section 1d", e),
        }
    }
    if interrupted().is_err() {
        return Ok(false);
    }
    if wants(2) {
        eprintln!("==> 2. load time (sentinel deny import)");
        settle("section 2");
        // In-process loads of the import's size come from section 1 when
        // it loaded that many, else they are measured here.
        if !loads.iter().any(|l| l.entries == import_entries) {
            match testrun::load_times(&Kind::ALL, import_entries) {
                Ok(l) => loads.extend(l),
                Err(e) => fail("section 2 (in-process)", e),
            }
        }
        match import::run(&bin, &Kind::ALL, import_entries) {
            Ok(e2e) => print(&report::load(&loads, &e2e)),
            Err(e) => {
                if !loads.is_empty() {
                    print(&report::load(&loads, &[]));
                }
                fail("section 2", e);
            }
        }
    } else if !loads.is_empty() {
        print(&report::load(&loads, &[]));
    }
    if interrupted().is_err() {
        return Ok(false);
    }
    if wants(3) {
        eprintln!("==> 3. deny add -> first drop");
        settle("section 3");
        match &ns {
            Some(ns) => match latency::run(&bin, ns, args.latency_repeats) {
                Ok(l) => print(&report::latency(&l)),
                Err(e) => fail("section 3", e),
            },
            None => fail("section 3", anyhow::anyhow!("no network namespace")),
        }
    }
    if interrupted().is_err() {
        return Ok(false);
    }
    if wants(4) {
        eprintln!("==> 4. flood");
        settle("section 4");
        match &ns {
            Some(ns) => match flood::run(ns, args.flood_packets, args.flood_rounds) {
                Ok(f) => print(&report::flood(&f, args.flood_packets, args.flood_rounds)),
                Err(e) => fail("section 4", e),
            },
            None => fail("section 4", anyhow::anyhow!("no network namespace")),
        }
    }
    drop(ns);
    println!("Total time: {}.", report::short(started.elapsed()));
    Ok(!failed)
}

/// Waits for a quiet machine, runs `bench` and prints its tables and the
/// time it took.
fn timed(section: &str, bench: impl FnOnce() -> Result<Vec<Table>>) -> Result<bool> {
    let started = Instant::now();
    settle(section);
    for table in bench()? {
        print(&table);
    }
    println!("Total time: {}.", report::short(started.elapsed()));
    Ok(true)
}

/// What the benchmarks through the daemon do first: find the `sentinel`
/// binary, mount bpffs, clear leftovers of an earlier run, and print the
/// report's header for `sentinel-bench NAME`.
fn proxy_prelude(sentinel_bin: Option<&Path>, name: &str) -> Result<PathBuf> {
    let bin = match sentinel_bin {
        Some(bin) => bin.to_owned(),
        None => std::env::current_exe()
            .context("cannot locate this program")?
            .with_file_name("sentinel"),
    };
    if !bin.exists() {
        bail!(
            "{} does not exist: build it or pass --sentinel-bin",
            bin.display()
        );
    }
    bpf::ensure_bpffs().context("cannot mount bpffs at /sys/fs/bpf")?;
    for line in stale::clean() {
        eprintln!("    removed a leftover of an earlier run: {line}");
    }
    let argv: Vec<String> = match std::env::var("SENTINEL_BENCH_COMMAND") {
        Ok(command) => vec![command],
        Err(_) => std::env::args().collect(),
    };
    let head = header(&argv).replacen(
        "## sentinel-bench xdp",
        &format!("## sentinel-bench {name}"),
        1,
    );
    println!("{head}- proxy peers: {}\n", proxy::versions());
    Ok(bin)
}

fn bench_proxy(mut args: ProxyArgs) -> Result<bool> {
    if args.quick {
        args.duration = 2;
        args.rounds = 1;
        args.idle_connections = 1_000;
    }
    if args.rounds == 0 || args.connections == 0 || args.duration == 0 {
        bail!("--rounds, --connections and --duration must not be zero");
    }
    let bin = proxy_prelude(args.sentinel_bin.as_deref(), "proxy")?;
    let plan = proxy::Plan {
        duration: Duration::from_secs(args.duration),
        connections: args.connections,
        rounds: args.rounds,
        idle_connections: args.idle_connections,
    };
    timed("the proxy benchmark", || {
        let results = proxy::run(&bin, &plan)?;
        Ok(proxy::report(&results, &plan))
    })
}

fn bench_agents(mut args: AgentsArgs) -> Result<bool> {
    if args.quick {
        args.requests = 500;
        args.duration = 2;
        args.rounds = 1;
    }
    if args.rounds == 0 || args.requests == 0 || args.rate == 0 || args.duration == 0 {
        bail!("--rounds, --requests, --rate and --duration must not be zero");
    }
    let bin = proxy_prelude(args.sentinel_bin.as_deref(), "agents")?;
    let plan = agents::Plan {
        rate: args.rate,
        requests: args.requests,
        rounds: args.rounds,
        wrk: proxy::Plan {
            duration: Duration::from_secs(args.duration),
            connections: args.connections,
            rounds: args.rounds,
            idle_connections: 0,
        },
    };
    timed("the agents benchmark", || {
        let results = agents::run(&bin, &plan)?;
        Ok(agents::report(&results, &plan))
    })
}

fn bench_profile(mut args: ProfileArgs) -> Result<bool> {
    if args.quick {
        args.requests = 500;
        args.duration = 2;
        args.rounds = 1;
    }
    if args.rounds == 0 || args.requests == 0 || args.rate == 0 || args.duration == 0 {
        bail!("--rounds, --requests, --rate and --duration must not be zero");
    }
    let bin = proxy_prelude(args.sentinel_bin.as_deref(), "profile")?;
    let plan = profile::Plan {
        rate: args.rate,
        requests: args.requests,
        rounds: args.rounds,
        wrk: proxy::Plan {
            duration: Duration::from_secs(args.duration),
            connections: args.connections,
            rounds: args.rounds,
            idle_connections: 0,
        },
    };
    timed("the profile benchmark", || {
        let results = profile::run(&bin, &plan)?;
        Ok(profile::report(&results, &plan))
    })
}

fn bench_steering(mut args: SteeringArgs) -> Result<bool> {
    if args.quick {
        args.connections = 2_000;
        args.rounds = 1;
    }
    if args.rounds == 0 || args.connections == 0 {
        bail!("--rounds and --connections must not be zero");
    }
    let bin = proxy_prelude(args.sentinel_bin.as_deref(), "steering")?;
    let plan = steering::Plan {
        connections: args.connections,
        rounds: args.rounds,
    };
    timed("the steering benchmark", || {
        let results = steering::run(&bin, &plan)?;
        Ok(steering::report(&results, &plan))
    })
}

/// Runs a benchmark that needs root, or says SKIPPED and why.
fn privileged(name: &str, why: &str, bench: impl FnOnce() -> Result<bool>) -> ExitCode {
    if !is_root() {
        println!("SKIPPED: bench {name} needs root ({why})");
        return ExitCode::SUCCESS;
    }
    install_signal_handlers();
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    const DAEMON: &str = "the daemon loads BPF";
    match cli.bench {
        Bench::Steering(args) => privileged("steering", "BPF, network namespaces", || {
            bench_steering(args)
        }),
        Bench::Agents(args) => privileged("agents", DAEMON, || bench_agents(args)),
        Bench::Profile(args) => privileged("profile", DAEMON, || bench_profile(args)),
        Bench::Proxy(args) => privileged("proxy", DAEMON, || bench_proxy(args)),
        Bench::Xdp(args) => privileged("xdp", "XDP, network namespaces, firewall rules", || {
            xdp(args)
        }),
    }
}
