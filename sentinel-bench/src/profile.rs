//! `sentinel-bench profile`: what each runtime-profile mode costs a request.
//!
//! Four daemons, one per mode (off, lite, monitor, protection), all up for
//! the whole run so that rounds alternate between them, in front of the
//! same nginx upstream. Every mode that records keeps its records in its
//! own store and ships them to a collector (an nginx location answering
//! 204), as an operator would run it. No agents: what is measured is the
//! profile's own work (record building, body taps, the store's writer, the
//! shipper).
//!
//! 1. Throughput and latency under load: wrk, with a browser User-Agent so
//!    that each record parses one.
//! 2. Latency at a fixed, moderate rate, one request at a time.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    agents::{self, Run},
    daemon::Daemon,
    interrupted,
    proxy::{self, Nginx, WrkResult},
    table::Table,
};

pub const MODES: [&str; 4] = ["off", "lite", "monitor", "protection"];

const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36";

pub struct Plan {
    /// Requests per second of the fixed-rate runs.
    pub rate: u32,
    /// Requests per fixed-rate run.
    pub requests: usize,
    /// Rounds, rotating the order (the median is reported).
    pub rounds: usize,
    pub wrk: proxy::Plan,
}

pub struct Results {
    /// Per mode: wrk runs, fixed-rate runs, records stored at the end.
    pub modes: Vec<(&'static str, Vec<WrkResult>, Vec<Run>, u64)>,
}

fn blocks(upstream_port: u16, mode: &str, store: &Path) -> String {
    let records = if mode == "off" {
        String::new()
    } else {
        format!(
            "    store {{\n        path \"{}\"\n    }}\n    collector {{\n        url \"http://127.0.0.1:{upstream_port}/ingest\"\n    }}\n",
            store.display()
        )
    };
    format!(
        "system {{\n    worker-threads 1\n    max-connections 100000\n}}\n\
         listeners {{\n    listener \"bench\" {{\n        address \"127.0.0.1:0\"\n        keepalive-timeout-secs 300\n    }}\n}}\n\
         routes {{\n    route \"all\" {{\n        upstream \"backend\"\n    }}\n}}\n\
         upstreams {{\n    upstream \"backend\" {{\n        targets {{\n            target {{ address \"127.0.0.1:{upstream_port}\" }}\n        }}\n        connection-pool {{\n            max-idle 64\n        }}\n    }}\n}}\n\
         profile {{\n    mode \"{mode}\"\n{records}}}\n"
    )
}

/// One wrk run against `url` with a browser User-Agent.
fn wrk(url: &str, plan: &proxy::Plan) -> Result<WrkResult> {
    let user_agent = format!("User-Agent: {USER_AGENT}");
    proxy::wrk_with(url, plan, &["-H", &user_agent])
}

/// The daemon's `sentinel_profile_records_stored_total`.
fn stored(daemon: &Daemon) -> u64 {
    daemon
        .metric("sentinel_profile_records_stored_total")
        .unwrap_or(0.0) as u64
}

pub fn run(bin: &Path, plan: &Plan) -> Result<Results> {
    let upstream_port = proxy::free_port()?;
    let upstream = Nginx::start(
        "upstream",
        &format!(
            "server {{ listen 127.0.0.1:{upstream_port} backlog=4096; \
               location = /small {{ default_type text/plain; return 200 \"hello from upstream\\n\"; }} \
               location = /ingest {{ return 204; }} }}"
        ),
    )?;
    let upstream_addr: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
    proxy::wait_http(upstream_addr, "/small")?;

    let stores = tempfile::Builder::new()
        .prefix("sentinel-bench-profile-")
        .tempdir()?;
    let mut setups = Vec::new();
    for mode in MODES {
        let store = stores.path().join(mode);
        let daemon = Daemon::start_with(bin, None, &blocks(upstream_port, mode, &store))?;
        let addr = daemon.listener("bench")?;
        proxy::wait_http(addr, "/small")?;
        setups.push((mode, daemon, addr));
    }

    let mut wrk_runs: Vec<Vec<WrkResult>> = MODES.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.rounds {
        for k in 0..setups.len() {
            interrupted()?;
            let which = (k + round) % setups.len();
            let (mode, _, addr) = &setups[which];
            eprintln!("    throughput, round {}: {mode}", round + 1);
            wrk_runs[which].push(wrk(&format!("http://{addr}/small"), &plan.wrk)?);
        }
    }
    let mut fixed: Vec<Vec<Run>> = MODES.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.rounds {
        for k in 0..setups.len() {
            interrupted()?;
            let which = (k + round) % setups.len();
            let (mode, _, addr) = &setups[which];
            eprintln!("    fixed rate, round {}: {mode}", round + 1);
            fixed[which].push(agents::http_run(*addr, plan.rate, plan.requests)?);
        }
    }
    // Let the writers catch up, then check that records were really kept.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut modes = Vec::new();
    for (((mode, daemon, _), w), f) in setups.iter().zip(wrk_runs).zip(fixed) {
        let mut n = stored(daemon);
        while *mode != "off" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let next = stored(daemon);
            if next == n {
                break;
            }
            n = next;
        }
        if *mode != "off" && n == 0 {
            bail!("the {mode} daemon stored no record:\n{}", daemon.log());
        }
        modes.push((*mode, w, f, n));
    }
    drop(setups);
    drop(upstream);
    Ok(Results { modes })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn verdict(ok: bool) -> String {
    if ok { "PASS".into() } else { "MISS".into() }
}

pub fn report(results: &Results, plan: &Plan) -> Vec<Table> {
    let rps = |w: &[WrkResult]| median(w.iter().map(|r| r.rps).collect());
    let p50 = |w: &[WrkResult]| median(w.iter().map(|r| r.p50_ms).collect());
    let p99 = |w: &[WrkResult]| median(w.iter().map(|r| r.p99_ms).collect());
    let off = &results.modes[0];
    let (off_rps, off_p99) = (rps(&off.1), p99(&off.1));
    let mut t = Table::new(
        "Throughput and latency by mode, one worker (wrk, median of rounds)",
        &[
            "mode",
            "req/s",
            "vs off",
            "p50 ms",
            "p99 ms",
            "p99 vs off",
            "target (lite: >= 0.95 req/s, <= 1.10 p99)",
            "errors",
            "records stored",
        ],
    );
    for (mode, w, _, stored) in &results.modes {
        let (r, q) = (rps(w) / off_rps, p99(w) / off_p99);
        let target = if *mode == "lite" {
            format!("{} / {}", verdict(r >= 0.95), verdict(q <= 1.10))
        } else {
            "-".into()
        };
        t.row(vec![
            (*mode).to_owned(),
            format!("{:.0}", rps(w)),
            format!("{r:.3}"),
            format!("{:.2}", p50(w)),
            format!("{:.2}", p99(w)),
            format!("{q:.3}"),
            target,
            w.iter().map(|r| r.errors).sum::<u64>().to_string(),
            stored.to_string(),
        ]);
    }
    t.note(&format!(
        "wrk -t1 -c{} -d{}s, GET of a 20-byte response with a browser User-Agent, {} rounds in rotating order; each recording mode stores its records and ships them to a collector.",
        plan.wrk.connections,
        plan.wrk.duration.as_secs(),
        plan.rounds
    ));

    let fp50 = |runs: &[Run]| median(runs.iter().map(|r| r.p50_us).collect());
    let fp99 = |runs: &[Run]| median(runs.iter().map(|r| r.p99_us).collect());
    let off_f99 = fp99(&off.2);
    let mut f = Table::new(
        "Latency at a fixed rate by mode (median of rounds)",
        &["mode", "p50 µs", "p99 µs", "p99 vs off", "errors"],
    );
    for (mode, _, runs, _) in &results.modes {
        f.row(vec![
            (*mode).to_owned(),
            format!("{:.0}", fp50(runs)),
            format!("{:.0}", fp99(runs)),
            format!("{:.3}", fp99(runs) / off_f99),
            runs.iter().map(|r| r.errors).sum::<usize>().to_string(),
        ]);
    }
    f.note(&format!(
        "{} requests per run at {} per second on one keep-alive connection.",
        plan.requests, plan.rate
    ));
    vec![t, f]
}
