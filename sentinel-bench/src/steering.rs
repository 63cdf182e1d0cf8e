//! `sentinel-bench steering`: what sk_lookup steering costs a new
//! connection, against a plain bound listener, side by side.
//!
//! One daemon runs inside a network namespace of its own (only loopback
//! up, so its sk_lookup program is attached there and never to the
//! machine's namespace; the namespace is removed on drop, also after an
//! error). Its listener `bench` is bound to 127.0.0.1 on a kernel-chosen
//! port P, and a steering rule hands ports 20000-20999 of 127.0.0.0/8,
//! where nothing is bound, to that same listener. A client thread that
//! joined the namespace then alternates rounds:
//!
//! - plain: new TCP connections to 127.0.0.1:P, the bound socket;
//! - steered: new TCP connections to 127.0.0.1:20000-20999, in turn.
//!
//! Each connection is connect() (timed alone), then close with SO_LINGER 0
//! (a reset, so that no TIME_WAIT piles up and the ephemeral ports last).
//! The program runs on every listener lookup of the namespace, so the plain
//! path pays its call too (and finds no rule); what the comparison shows is
//! a rule's match and the socket handed over versus the kernel's own hash
//! lookup.

use std::{
    fs::File,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{daemon::Daemon, interrupted, netns::ip, table::Table};

/// Ports the steering rule names; nothing is bound on them.
pub const RANGE: (u16, u16) = (20000, 20999);

pub struct Plan {
    /// Connections per round and path.
    pub connections: usize,
    /// Rounds, alternating the order (the median is reported).
    pub rounds: usize,
}

/// One round of one path.
pub struct Round {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: usize,
}

pub struct Results {
    pub plain: Vec<Round>,
    pub steered: Vec<Round>,
    pub port: u16,
}

/// A namespace with only loopback, up; removed on drop.
struct LoNs {
    name: String,
}

impl LoNs {
    fn new() -> Result<Self> {
        let name = format!("sentinel-bench-{}-steer", std::process::id());
        if path(&name).exists() {
            bail!("namespace {name} already exists");
        }
        ip(&["netns", "add", &name])?;
        let ns = LoNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        path(&self.name)
    }
}

fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

impl Drop for LoNs {
    fn drop(&mut self) {
        if self.path().exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }
}

fn blocks() -> &'static str {
    "system {\n    worker-threads 1\n    max-connections 100000\n}\n\
     listeners {\n    listener \"bench\" {\n        address \"127.0.0.1:0\"\n    }\n}\n\
     routes {\n    route \"all\" {\n        static-response 200 \"ok\"\n    }\n}\n"
}

fn steering() -> String {
    format!(
        "    steering {{\n        rule listener=\"bench\" prefix=\"127.0.0.0/8\" ports=\"{}-{}\"\n    }}",
        RANGE.0, RANGE.1
    )
}

/// connect() to `to`, timed, then an abortive close.
fn one(to: SocketAddr) -> std::io::Result<Duration> {
    let start = Instant::now();
    let stream = TcpStream::connect(to)?;
    let took = start.elapsed();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor `stream` owns, with a linger
    // struct that lives for the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
    Ok(took)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// `n` connections, to `target(i)` for the i-th.
fn round(n: usize, target: impl Fn(usize) -> SocketAddr) -> Round {
    let mut took = Vec::with_capacity(n);
    let mut errors = 0;
    let start = Instant::now();
    for i in 0..n {
        match one(target(i)) {
            Ok(t) => took.push(t),
            Err(_) => errors += 1,
        }
    }
    let elapsed = start.elapsed();
    took.sort_unstable();
    Round {
        rate: n as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&took, 0.50),
        p99_us: percentile(&took, 0.99),
        errors,
    }
}

/// Joins the namespace at `path` (this thread only).
fn enter(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: `file` is an open network namespace file; setns moves only
    // the calling thread, a thread of our own that ends with the client.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub fn run(bin: &Path, plan: &Plan) -> Result<Results> {
    let ns = LoNs::new()?;
    let daemon = Daemon::start_in(bin, None, &steering(), blocks(), Some(&ns.path()))?;
    let port = daemon.listener("bench")?.port();
    if (RANGE.0..=RANGE.1).contains(&port) {
        bail!("the kernel gave the listener port {port}, inside the steered range");
    }
    let ns_path = ns.path();
    let (connections, rounds) = (plan.connections, plan.rounds);
    let client = std::thread::spawn(move || -> Result<(Vec<Round>, Vec<Round>)> {
        enter(&ns_path)?;
        let plain_to = SocketAddr::from(([127, 0, 0, 1], port));
        let width = usize::from(RANGE.1 - RANGE.0) + 1;
        let steered_to =
            |i: usize| SocketAddr::from(([127, 0, 0, 1], RANGE.0 + (i % width) as u16));
        // Both paths must answer before anything is timed.
        for to in [plain_to, steered_to(0), steered_to(width - 1)] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Err(e) = one(to) {
                if Instant::now() > deadline {
                    bail!("cannot connect to {to} inside the namespace: {e}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Warm-up, not reported.
        round(connections.min(2_000), |_| plain_to);
        round(connections.min(2_000), steered_to);
        let (mut plain, mut steered) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            for k in 0..2 {
                interrupted()?;
                if (k + r) % 2 == 0 {
                    eprintln!("    round {}: plain", r + 1);
                    plain.push(round(connections, |_| plain_to));
                } else {
                    eprintln!("    round {}: steered", r + 1);
                    steered.push(round(connections, steered_to));
                }
            }
        }
        Ok((plain, steered))
    });
    let (plain, steered) = client
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    let errors: usize = plain.iter().chain(&steered).map(|r| r.errors).sum();
    if errors > 0 && errors * 100 >= connections * rounds {
        bail!("{errors} connections failed; daemon log:\n{}", daemon.log());
    }
    drop(daemon);
    drop(ns);
    Ok(Results {
        plain,
        steered,
        port,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

pub fn report(results: &Results, plan: &Plan) -> Vec<Table> {
    let rate = |r: &[Round]| median(r.iter().map(|x| x.rate).collect());
    let p50 = |r: &[Round]| median(r.iter().map(|x| x.p50_us).collect());
    let p99 = |r: &[Round]| median(r.iter().map(|x| x.p99_us).collect());
    let (plain_rate, plain_p99) = (rate(&results.plain), p99(&results.plain));
    let mut t = Table::new(
        "New TCP connections: steered by sk_lookup vs a plain bound listener (median of rounds)",
        &[
            "path",
            "conns/s",
            "vs plain",
            "p50 µs",
            "p99 µs",
            "p99 vs plain",
            "target (steered: >= 0.95 conns/s, <= 1.05 p99)",
            "errors",
        ],
    );
    for (name, rounds) in [
        (
            format!("plain (127.0.0.1:{}, bound)", results.port),
            &results.plain,
        ),
        (
            format!("steered (127.0.0.1:{}-{}, unbound)", RANGE.0, RANGE.1),
            &results.steered,
        ),
    ] {
        let (r, q) = (rate(rounds) / plain_rate, p99(rounds) / plain_p99);
        let target = if std::ptr::eq(rounds, &results.steered) {
            format!("{} / {}", verdict(r >= 0.95), verdict(q <= 1.05))
        } else {
            "-".into()
        };
        t.row(vec![
            name,
            format!("{:.0}", rate(rounds)),
            format!("{r:.3}"),
            format!("{:.1}", p50(rounds)),
            format!("{:.1}", p99(rounds)),
            format!("{q:.3}"),
            target,
            rounds.iter().map(|x| x.errors).sum::<usize>().to_string(),
        ]);
    }
    t.note(&format!(
        "One daemon (one worker) in a namespace of its own, loopback only; one client thread in the same namespace. \
         {} connections per round and path, {} rounds in alternating order; each is connect() (timed: the latency columns) \
         then close with SO_LINGER 0; conns/s counts connect + close. The sk_lookup program runs on both paths; \
         only the steered one matches a rule.",
        plan.connections, plan.rounds
    ));
    vec![t]
}
