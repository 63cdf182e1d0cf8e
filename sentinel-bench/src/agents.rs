//! `sentinel-bench agents`: what an agent costs a request.
//!
//! 1. Latency at a fixed, moderate rate through `sentinel` with no agent
//!    and with the reference echo agent over each transport (Unix socket,
//!    gRPC, HTTP), side by side with the floor: a raw Unix-socket
//!    ping-pong, in this process, of the same request and answer payloads
//!    the proxy and the echo agent exchange, with no JSON work at all.
//! 2. Throughput (wrk) with no agent and with the Unix-socket agent.
//!
//! The upstream is an nginx answering a small response from memory.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, Event, HeaderOp, Headers, RequestHeadersEvent, RequestMetadata,
};

use crate::{
    daemon::Daemon,
    interrupted,
    proxy::{self, Nginx, WrkResult},
    table::Table,
};

pub struct Plan {
    /// Requests per second of the fixed-rate latency runs.
    pub rate: u32,
    /// Requests per latency run.
    pub requests: usize,
    /// Alternating rounds (the median is reported).
    pub rounds: usize,
    /// Seconds and connections of a wrk run.
    pub wrk: proxy::Plan,
}

/// Latency samples of one run, in microseconds.
#[derive(Debug, Clone)]
pub struct Run {
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summarize(mut samples: Vec<f64>, errors: usize) -> Run {
    samples.sort_by(|a, b| a.total_cmp(b));
    Run {
        p50_us: percentile(&samples, 0.50),
        p99_us: percentile(&samples, 0.99),
        errors,
    }
}

/// Sleeps until `at` (the schedule of a fixed-rate run).
fn wait_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// `requests` GETs of `/small` on one keep-alive connection, one every
/// 1/`rate` s; the latency of each.
fn http_run(addr: SocketAddr, rate: u32, requests: usize) -> Result<Run> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let request =
        b"GET /small HTTP/1.1\r\nHost: bench\r\nUser-Agent: sentinel-bench\r\nAccept: */*\r\n\r\n";
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut samples = Vec::with_capacity(requests);
    let mut errors = 0;
    let mut buf = vec![0u8; 16 * 1024];
    let start = Instant::now();
    for i in 0..requests {
        if i % 1000 == 0 {
            interrupted()?;
        }
        wait_until(start + period * i as u32);
        let sent = Instant::now();
        s.write_all(request)?;
        let (status, _) = read_response(&mut s, &mut buf)?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
        if status != 200 {
            errors += 1;
        }
    }
    Ok(summarize(samples, errors))
}

/// Reads one HTTP/1.1 response with a Content-Length; its status and size.
fn read_response(s: &mut TcpStream, buf: &mut [u8]) -> Result<(u16, usize)> {
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..])?;
        if n == 0 {
            bail!("the connection closed mid-response");
        }
        got += n;
        let Some(end) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n") else {
            if got == buf.len() {
                bail!("response head too large");
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let total = end + 4 + length;
        if total > buf.len() {
            bail!("response of {total} bytes is larger than the benchmark reads");
        }
        while got < total {
            let n = s.read(&mut buf[got..total])?;
            if n == 0 {
                bail!("the connection closed mid-body");
            }
            got += n;
        }
        return Ok((status, total));
    }
}

/// The `request_headers` event the proxy sends for the benchmark's request,
/// and the echo agent's answer: the floor's payloads.
fn payloads() -> (Vec<u8>, Vec<u8>) {
    let mut headers = Headers::new();
    for (k, v) in [
        ("host", "bench"),
        ("user-agent", "sentinel-bench"),
        ("accept", "*/*"),
        ("x-request-id", "5d1c8b8e-6e0e-4f1b-9d2a-0c4e5e6f7a8b"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "bench"),
        ("forwarded", "for=127.0.0.1;host=bench;proto=http"),
    ] {
        headers.insert(k.to_owned(), vec![v.to_owned()]);
    }
    let mut request = AgentRequest::new(Event::RequestHeaders(RequestHeadersEvent {
        metadata: RequestMetadata {
            correlation_id: "0e9f2c1a-3b4d-4e5f-8a6b-7c8d9e0f1a2b".into(),
            request_id: "5d1c8b8e-6e0e-4f1b-9d2a-0c4e5e6f7a8b".into(),
            client_ip: "127.0.0.1".into(),
            client_port: 51544,
            server_name: Some("bench".into()),
            protocol: "HTTP/1.1".into(),
            tls_version: None,
            route_id: Some("all".into()),
            upstream_id: Some("backend".into()),
            listener: Some("bench".into()),
            timestamp: "2026-12-01T00:00:00.000Z".into(),
        },
        method: "GET".into(),
        uri: "/small".into(),
        headers,
    }));
    request.id = Some(123_456);
    let answer = AgentResponse {
        id: Some(123_456),
        request_headers: vec![HeaderOp::Set {
            name: "X-Agent-Processed".into(),
            value: "true".into(),
        }],
        ..AgentResponse::allow()
    };
    (request.to_json(), answer.to_json())
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    s.read_exact(buf)
}

/// The floor: the same payloads over a Unix socket, answered at once by a
/// thread that does nothing else.
fn floor_run(rate: u32, requests: usize) -> Result<Run> {
    let (request, answer) = payloads();
    let dir = tempfile::Builder::new()
        .prefix("sentinel-bench-floor-")
        .tempdir()?;
    let path = dir.path().join("floor.sock");
    let listener = UnixListener::bind(&path)?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let reply = framed(&answer);
        let mut buf = Vec::new();
        loop {
            if read_frame(&mut s, &mut buf).is_err() {
                return Ok(());
            }
            s.write_all(&reply)?;
        }
    });
    let mut s = UnixStream::connect(&path)?;
    let frame = framed(&request);
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut samples = Vec::with_capacity(requests);
    let mut buf = Vec::new();
    let start = Instant::now();
    for i in 0..requests {
        wait_until(start + period * i as u32);
        let sent = Instant::now();
        s.write_all(&frame)?;
        read_frame(&mut s, &mut buf)?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    drop(s);
    let _ = server.join();
    Ok(summarize(samples, 0))
}

/// The echo agent alone: this program plays the proxy, over the agent's
/// Unix socket, with the floor's payloads (configure first, then one
/// request at a time at the fixed rate). What the agent costs without the
/// proxy's own work.
fn agent_alone_run(socket: &Path, rate: u32, requests: usize) -> Result<Run> {
    let (request, _) = payloads();
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let configure = AgentRequest::new(Event::Configure(sentinel_agent_protocol::ConfigureEvent {
        agent_id: "echo".into(),
        ..Default::default()
    }));
    s.write_all(&framed(&configure.to_json()))?;
    let mut buf = Vec::new();
    read_frame(&mut s, &mut buf)?;
    // Without the multiplex extension the request carries no id.
    let mut plain: AgentRequest = AgentRequest::from_json(&request)?;
    plain.id = None;
    let frame = framed(&plain.to_json());
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut samples = Vec::with_capacity(requests);
    let start = Instant::now();
    for i in 0..requests {
        wait_until(start + period * i as u32);
        let sent = Instant::now();
        s.write_all(&frame)?;
        read_frame(&mut s, &mut buf)?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    Ok(summarize(samples, 0))
}

/// A reference agent process, killed on drop.
struct AgentProcess {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The transports measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    None,
    Unix,
    Grpc,
    Http,
}

impl Transport {
    pub const ALL: [Transport; 4] = [
        Transport::None,
        Transport::Unix,
        Transport::Grpc,
        Transport::Http,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Transport::None => "no agent",
            Transport::Unix => "echo agent, Unix socket",
            Transport::Grpc => "echo agent, gRPC",
            Transport::Http => "echo agent, HTTP",
        }
    }
}

/// Starts the echo agent on `transport`; the KDL transport line.
fn start_agent(echo: &Path, transport: Transport) -> Result<(AgentProcess, String)> {
    let dir = tempfile::Builder::new()
        .prefix("sentinel-bench-agent-")
        .tempdir()?;
    let (args, line, ready): (Vec<String>, String, Box<dyn Fn() -> bool>) = match transport {
        Transport::Unix => {
            let socket = dir.path().join("echo.sock");
            let s = socket.clone();
            (
                vec!["--socket".into(), socket.display().to_string()],
                format!("unix-socket \"{}\"", socket.display()),
                Box::new(move || s.exists()),
            )
        }
        Transport::Grpc | Transport::Http => {
            let port = proxy::free_port()?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let flag = if transport == Transport::Grpc {
                "--grpc"
            } else {
                "--http"
            };
            let line = if transport == Transport::Grpc {
                format!("grpc \"http://127.0.0.1:{port}\"")
            } else {
                format!("http \"http://127.0.0.1:{port}/agent\"")
            };
            (
                vec![flag.into(), addr.to_string()],
                line,
                Box::new(move || TcpStream::connect(addr).is_ok()),
            )
        }
        Transport::None => bail!("no agent to start"),
    };
    let child = Command::new(echo)
        .args(&args)
        .arg("--log-level")
        .arg("warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", echo.display()))?;
    let process = AgentProcess { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if Instant::now() > deadline {
            bail!("the echo agent did not start on {transport:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((process, line))
}

fn daemon_blocks(upstream_port: u16, agent: Option<&str>) -> String {
    let (filters_line, agents) = match agent {
        Some(line) => (
            "        filters \"echo\"\n".to_owned(),
            format!(
                "agents {{\n    agent \"echo\" type=\"custom\" {{\n        {line}\n        events \"request_headers\"\n        failure-mode \"closed\"\n        timeout-ms 5000\n        max-concurrent-calls 1000\n    }}\n}}\n\
                 filters {{\n    filter \"echo\" {{ type \"agent\"; agent \"echo\"; }}\n}}\n"
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "system {{\n    worker-threads 1\n    max-connections 100000\n}}\n\
         listeners {{\n    listener \"bench\" {{\n        address \"127.0.0.1:0\"\n        keepalive-timeout-secs 300\n    }}\n}}\n\
         routes {{\n    route \"all\" {{\n        upstream \"backend\"\n{filters_line}    }}\n}}\n\
         upstreams {{\n    upstream \"backend\" {{\n        targets {{\n            target {{ address \"127.0.0.1:{upstream_port}\" }}\n        }}\n        connection-pool {{\n            max-idle 64\n        }}\n    }}\n}}\n{agents}"
    )
}

pub struct Results {
    /// Per transport, the latency runs.
    pub latency: Vec<(Transport, Vec<Run>)>,
    pub floor: Vec<Run>,
    /// The echo agent over its Unix socket without the proxy.
    pub agent_alone: Vec<Run>,
    /// (no agent, Unix-socket agent) wrk runs.
    pub throughput: Vec<(Transport, Vec<WrkResult>)>,
}

pub fn run(bin: &Path, plan: &Plan) -> Result<Results> {
    let echo: PathBuf = bin.with_file_name("sentinel-echo-agent");
    if !echo.exists() {
        bail!(
            "{} does not exist: build it (`cargo build --release -p sentinel-agents`)",
            echo.display()
        );
    }
    let upstream_port = proxy::free_port()?;
    let upstream = Nginx::start(
        "upstream",
        &format!(
            "server {{ listen 127.0.0.1:{upstream_port} backlog=4096; \
               location = /small {{ default_type text/plain; return 200 \"hello from upstream\\n\"; }} }}"
        ),
    )?;
    let upstream_addr: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
    proxy::wait_http(upstream_addr, "/small")?;

    // One daemon (and agent) per transport, all up for the whole run, so
    // that rounds can alternate between them.
    let mut setups = Vec::new();
    for transport in Transport::ALL {
        let (agent, line) = match transport {
            Transport::None => (None, None),
            t => {
                let (p, line) = start_agent(&echo, t)?;
                (Some(p), Some(line))
            }
        };
        let daemon = Daemon::start_with(bin, None, &daemon_blocks(upstream_port, line.as_deref()))?;
        let addr = daemon.listener("bench")?;
        proxy::wait_http(addr, "/small")?;
        setups.push((transport, daemon, addr, agent));
    }

    let mut latency: Vec<(Transport, Vec<Run>)> =
        Transport::ALL.iter().map(|t| (*t, Vec::new())).collect();
    let mut floor = Vec::new();
    let mut agent_alone = Vec::new();
    // A second echo agent on its own socket, for the run without the
    // proxy.
    let (alone, alone_line) = start_agent(&echo, Transport::Unix)?;
    let alone_socket = PathBuf::from(
        alone_line
            .trim_start_matches("unix-socket \"")
            .trim_end_matches('"'),
    );
    for round in 0..plan.rounds {
        // Rotate which goes first.
        let n = setups.len() + 2;
        for k in 0..n {
            interrupted()?;
            let which = (k + round) % n;
            if which == setups.len() {
                eprintln!("    latency, round {}: raw Unix-socket floor", round + 1);
                floor.push(floor_run(plan.rate, plan.requests)?);
            } else if which == setups.len() + 1 {
                eprintln!("    latency, round {}: echo agent alone", round + 1);
                agent_alone.push(agent_alone_run(&alone_socket, plan.rate, plan.requests)?);
            } else {
                let (t, _, addr, _) = &setups[which];
                eprintln!("    latency, round {}: {}", round + 1, t.label());
                let r = http_run(*addr, plan.rate, plan.requests)?;
                latency[which].1.push(r);
            }
        }
    }

    let mut throughput: Vec<(Transport, Vec<WrkResult>)> =
        Transport::ALL.iter().map(|t| (*t, Vec::new())).collect();
    for round in 0..plan.rounds {
        for k in 0..setups.len() {
            interrupted()?;
            let which = (k + round) % setups.len();
            let (t, _, addr, _) = &setups[which];
            eprintln!("    throughput, round {}: {}", round + 1, t.label());
            let r = proxy::wrk(&format!("http://{addr}/small"), &plan.wrk)?;
            throughput[which].1.push(r);
        }
    }
    drop(alone);
    drop(setups);
    drop(upstream);
    Ok(Results {
        latency,
        floor,
        agent_alone,
        throughput,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn verdict(ok: bool) -> String {
    if ok { "PASS".into() } else { "MISS".into() }
}

pub fn report(results: &Results, plan: &Plan) -> Vec<Table> {
    let p50 = |runs: &[Run]| median(runs.iter().map(|r| r.p50_us).collect());
    let p99 = |runs: &[Run]| median(runs.iter().map(|r| r.p99_us).collect());
    let none = &results.latency[0].1;
    let floor_p50 = p50(&results.floor);
    let mut t = Table::new(
        "Latency added per request at a fixed rate (median of rounds)",
        &[
            "path",
            "p50 µs",
            "p99 µs",
            "added p50 µs",
            "added p99 µs",
            "added p50 / floor p50",
            "target: Unix socket <= 2x floor",
            "errors",
        ],
    );
    for (transport, runs) in &results.latency {
        let added50 = p50(runs) - p50(none);
        let added99 = p99(runs) - p99(none);
        let (ratio, target) = match transport {
            Transport::None => ("-".to_owned(), "-".to_owned()),
            Transport::Unix => (
                format!("{:.2}", added50 / floor_p50),
                verdict(added50 <= 2.0 * floor_p50),
            ),
            _ => (format!("{:.2}", added50 / floor_p50), "-".to_owned()),
        };
        t.row(vec![
            transport.label().to_owned(),
            format!("{:.0}", p50(runs)),
            format!("{:.0}", p99(runs)),
            if *transport == Transport::None {
                "-".into()
            } else {
                format!("{added50:.0}")
            },
            if *transport == Transport::None {
                "-".into()
            } else {
                format!("{added99:.0}")
            },
            ratio,
            target,
            runs.iter().map(|r| r.errors).sum::<usize>().to_string(),
        ]);
    }
    t.row(vec![
        "for reference: the echo agent alone, over its socket".into(),
        format!("{:.0}", p50(&results.agent_alone)),
        format!("{:.0}", p99(&results.agent_alone)),
        "-".into(),
        "-".into(),
        format!("{:.2}", p50(&results.agent_alone) / floor_p50),
        "-".into(),
        "0".into(),
    ]);
    t.row(vec![
        "floor: raw Unix-socket ping-pong, same payloads".into(),
        format!("{floor_p50:.0}"),
        format!("{:.0}", p99(&results.floor)),
        "-".into(),
        "-".into(),
        "1.00".into(),
        "-".into(),
        "0".into(),
    ]);
    t.note(&format!(
        "{} GET /small per run on one keep-alive connection, one every {:.2} ms ({} req/s), {} rounds rotating the order; sentinel `worker-threads 1`, the echo agent (sentinel-echo-agent) on the same machine. Added: p50 (p99) with the agent minus p50 (p99) with no agent. Floor: this program sends the `request_headers` event the proxy sends and reads the echo agent's answer ({} and {} bytes of JSON) over a Unix socket to a thread that answers at once, at the same rate.",
        plan.requests,
        1000.0 / f64::from(plan.rate.max(1)),
        plan.rate,
        plan.rounds,
        payloads().0.len(),
        payloads().1.len(),
    ));

    let rps = |runs: &[WrkResult]| median(runs.iter().map(|r| r.rps).collect());
    let base = rps(&results.throughput[0].1);
    let mut w = Table::new(
        "Throughput with and without an agent (wrk, median of rounds)",
        &[
            "path",
            "req/s",
            "vs no agent",
            "target: Unix socket >= 0.60",
            "p50 ms",
            "p99 ms",
            "errors",
        ],
    );
    for (transport, runs) in &results.throughput {
        let ratio = rps(runs) / base;
        w.row(vec![
            transport.label().to_owned(),
            format!("{:.0}", rps(runs)),
            format!("{ratio:.2}"),
            if *transport == Transport::Unix {
                verdict(ratio >= 0.60)
            } else {
                "-".into()
            },
            format!("{:.3}", median(runs.iter().map(|r| r.p50_ms).collect())),
            format!("{:.3}", median(runs.iter().map(|r| r.p99_ms).collect())),
            runs.iter().map(|r| r.errors).sum::<u64>().to_string(),
        ]);
    }
    w.note(&format!(
        "wrk -t1 -c{} -d{}s --latency on /small, {} rounds rotating the order. The machine's two CPUs are shared by wrk, sentinel (one worker), the agent and the upstream nginx.",
        plan.wrk.connections,
        plan.wrk.duration.as_secs(),
        plan.rounds
    ));
    vec![t, w]
}
