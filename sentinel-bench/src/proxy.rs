//! `sentinel-bench proxy`: Sentinel's reverse proxy against nginx, both
//! configured the same way (one worker, keep-alive to the same upstream),
//! measured by wrk in alternating runs; and resident memory with many idle
//! keep-alive client connections.
//!
//! The upstream both proxies forward to is a third nginx serving a small
//! response and a 64 KiB file from memory, so neither proxy is measured
//! against a slow backend.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tempfile::TempDir;

use crate::{daemon::Daemon, interrupted, table::Table};

/// What to measure.
pub struct Plan {
    pub duration: Duration,
    pub connections: usize,
    pub rounds: usize,
    pub idle_connections: usize,
}

/// A free port on loopback (bound, read and released; the window in which
/// another process could take it is tiny and only on this machine).
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An nginx master process with its own prefix and configuration, stopped
/// on drop.
pub(crate) struct Nginx {
    child: Option<Child>,
    _dir: TempDir,
}

impl Nginx {
    pub(crate) fn start(name: &str, http_block: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("sentinel-bench-nginx-{name}-"))
            .tempdir()?;
        let conf = dir.path().join("nginx.conf");
        let text = format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes 1;\n\
             worker_rlimit_nofile {nofile};\n\
             pid {pid};\n\
             error_log {err} warn;\n\
             events {{ worker_connections 32768; }}\n\
             http {{\n\
                 access_log off;\n\
                 client_body_temp_path {tmp}/body;\n\
                 proxy_temp_path {tmp}/proxy;\n\
                 fastcgi_temp_path {tmp}/fastcgi;\n\
                 uwsgi_temp_path {tmp}/uwsgi;\n\
                 scgi_temp_path {tmp}/scgi;\n\
                 keepalive_timeout 300s;\n\
                 keepalive_requests 1000000;\n\
                 {http_block}\n\
             }}\n",
            pid = dir.path().join("nginx.pid").display(),
            err = dir.path().join("error.log").display(),
            tmp = dir.path().display(),
            nofile = nofile_limit(),
        );
        fs::write(&conf, text)?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx (is it installed?)")?;
        Ok(Self {
            child: Some(child),
            _dir: dir,
        })
    }

    /// The master and worker pids.
    fn pids(&self) -> Vec<u32> {
        let Some(master) = self.child.as_ref().map(Child::id) else {
            return Vec::new();
        };
        let mut pids = vec![master];
        let children = fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child, not reaped yet.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGQUIT);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_max
}

/// Waits until something answers HTTP on `addr`.
pub(crate) fn wait_http(addr: SocketAddr, path: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(head) = get(addr, path)
            && head.starts_with("HTTP/1.1 200")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing answers 200 on http://{addr}{path}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request on a new connection; the response head.
fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    Ok(text.split("\r\n\r\n").next().unwrap_or("").to_owned())
}

/// One wrk run.
#[derive(Debug, Clone, Copy)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

pub(crate) fn wrk(url: &str, plan: &Plan) -> Result<WrkResult> {
    wrk_with(url, plan, &[])
}

/// [`wrk`] with `extra` arguments (e.g. `-H "User-Agent: ..."`).
pub(crate) fn wrk_with(url: &str, plan: &Plan, extra: &[&str]) -> Result<WrkResult> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{}", plan.connections)])
        .arg(format!("-d{}s", plan.duration.as_secs().max(1)))
        .args(extra)
        .arg("--latency")
        .arg(url)
        .output()
        .context("cannot run wrk (is it installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let percentile = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| duration_ms(v.trim()))
    };
    // "Non-2xx or 3xx responses: N" and "Socket errors: connect 0, read 0, ..."
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += n.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Some(WrkResult {
        rps,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
        errors,
    })
}

/// "812.00us", "1.20ms", "2.00s" in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    Some(match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        _ => return None,
    })
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Opens `n` keep-alive connections to `addr`, each with one request
/// answered, and returns them still open.
fn idle_connections(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    let request = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n";
    for i in 0..n {
        if i % 1000 == 0 {
            interrupted()?;
        }
        let mut s = TcpStream::connect(addr).with_context(|| format!("connection {i}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request)?;
        // The small response fits one read; what matters is that it came.
        let mut buf = [0u8; 4096];
        let got = s.read(&mut buf).with_context(|| format!("response {i}"))?;
        if !buf[..got].starts_with(b"HTTP/1.1 200") {
            bail!(
                "connection {i}: unexpected answer {:?}",
                String::from_utf8_lossy(&buf[..got.min(80)])
            );
        }
        conns.push(s);
    }
    Ok(conns)
}

/// Resident memory (KiB, from `rss`) with a tenth of `n` idle
/// connections open to `addr`, then with all `n`, each read one second
/// after the last connection's response.
fn held_memory(addr: SocketAddr, n: usize, rss: impl Fn() -> u64) -> Result<(u64, u64)> {
    let first = n / 10;
    let mut conns = idle_connections(addr, first)?;
    std::thread::sleep(Duration::from_secs(1));
    let with_first = rss();
    conns.extend(idle_connections(addr, n - first)?);
    std::thread::sleep(Duration::from_secs(1));
    let with_all = rss();
    drop(conns);
    Ok((with_first, with_all))
}

/// Resident memory with idle connections: RSS (KiB) with the `first`
/// connections open and with `all` of them, for each proxy.
pub struct Memory {
    pub ours: (u64, u64),
    pub theirs: (u64, u64),
    pub first: usize,
    pub all: usize,
}

/// Raises the soft open-file limit to the hard one (children inherit it)
/// and checks that `needed` descriptors fit.
fn raise_nofile(needed: usize) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    if (limit.rlim_cur as usize) < needed {
        bail!(
            "{needed} idle connections need about that many open files, but the hard limit is {}; use --idle-connections {}",
            limit.rlim_cur,
            (limit.rlim_cur as usize).saturating_sub(1000)
        );
    }
    Ok(())
}

pub struct Results {
    /// (response label, sentinel runs, nginx runs)
    pub throughput: Vec<(String, Vec<WrkResult>, Vec<WrkResult>)>,
    /// (sentinel KiB before, after; nginx KiB before, after; connections)
    pub memory: Option<Memory>,
}

pub fn run(bin: &Path, plan: &Plan) -> Result<Results> {
    raise_nofile(plan.idle_connections + 500)?;
    let www = tempfile::Builder::new()
        .prefix("sentinel-bench-www-")
        .tempdir()?;
    fs::write(www.path().join("64k"), vec![b'x'; 64 * 1024])?;

    let upstream_port = free_port()?;
    let upstream = Nginx::start(
        "upstream",
        &format!(
            "server {{ listen 127.0.0.1:{upstream_port} backlog=4096; \
               location = /small {{ default_type text/plain; return 200 \"hello from upstream\\n\"; }} \
               location = /64k {{ root {}; default_type application/octet-stream; }} }}",
            www.path().display()
        ),
    )?;
    let upstream_addr: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
    wait_http(upstream_addr, "/small")?;

    let nginx_port = free_port()?;
    let nginx = Nginx::start(
        "proxy",
        &format!(
            "upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }} \
             server {{ listen 127.0.0.1:{nginx_port} backlog=4096; \
               location / {{ proxy_pass http://backend; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\"; proxy_set_header Host $host; \
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; \
                 proxy_buffering off; }} }}"
        ),
    )?;
    let nginx_addr: SocketAddr = ([127, 0, 0, 1], nginx_port).into();
    wait_http(nginx_addr, "/small")?;

    let blocks = format!(
        "system {{\n    worker-threads 1\n    max-connections 100000\n}}\n\
         listeners {{\n    listener \"bench\" {{\n        address \"127.0.0.1:0\"\n        keepalive-timeout-secs 300\n    }}\n}}\n\
         routes {{\n    route \"all\" {{\n        upstream \"backend\"\n    }}\n}}\n\
         upstreams {{\n    upstream \"backend\" {{\n        targets {{\n            target {{ address \"127.0.0.1:{upstream_port}\" }}\n        }}\n        connection-pool {{\n            max-idle 64\n        }}\n    }}\n}}\n"
    );
    let sentinel = Daemon::start_with(bin, None, &blocks)?;
    let sentinel_addr = sentinel.listener("bench")?;
    wait_http(sentinel_addr, "/small")?;

    let mut throughput = Vec::new();
    for (label, path) in [("small (20 B)", "/small"), ("64 KiB", "/64k")] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for round in 0..plan.rounds {
            interrupted()?;
            // Alternate which goes first so drift in the machine's load
            // does not favour one.
            let order: [(&str, SocketAddr); 2] = if round % 2 == 0 {
                [("sentinel", sentinel_addr), ("nginx", nginx_addr)]
            } else {
                [("nginx", nginx_addr), ("sentinel", sentinel_addr)]
            };
            for (who, addr) in order {
                eprintln!("    {label}, round {}: {who}", round + 1);
                let r = wrk(&format!("http://{addr}{path}"), plan)?;
                if who == "sentinel" {
                    ours.push(r);
                } else {
                    theirs.push(r);
                }
            }
        }
        throughput.push((label.to_owned(), ours, theirs));
    }

    let memory = if plan.idle_connections > 0 {
        eprintln!(
            "    memory: {} idle keep-alive connections to each",
            plan.idle_connections
        );
        let pid = sentinel.pid().context("the daemon is not running")?;
        let ours = held_memory(sentinel_addr, plan.idle_connections, || rss_kib(pid))?;
        let nginx_rss = || nginx.pids().iter().map(|p| rss_kib(*p)).sum::<u64>();
        let theirs = held_memory(nginx_addr, plan.idle_connections, nginx_rss)?;
        Some(Memory {
            ours,
            theirs,
            first: plan.idle_connections / 10,
            all: plan.idle_connections,
        })
    } else {
        None
    };
    drop(sentinel);
    drop(nginx);
    drop(upstream);
    Ok(Results { throughput, memory })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn report(results: &Results, plan: &Plan) -> Vec<Table> {
    let mut t = Table::new(
        "Requests per second and latency through one worker (wrk, median of rounds)",
        &[
            "response",
            "sentinel req/s",
            "nginx req/s",
            "sentinel / nginx",
            "target: >= 1",
            "sentinel p50 ms",
            "nginx p50 ms",
            "sentinel p99 ms",
            "nginx p99 ms",
            "p99 sentinel / nginx",
            "target: <= 1",
            "errors (s/n)",
        ],
    );
    for (label, ours, theirs) in &results.throughput {
        let m = |runs: &[WrkResult], f: fn(&WrkResult) -> f64| median(runs.iter().map(f).collect());
        let (rps_s, rps_n) = (m(ours, |r| r.rps), m(theirs, |r| r.rps));
        let (p50_s, p50_n) = (m(ours, |r| r.p50_ms), m(theirs, |r| r.p50_ms));
        let (p99_s, p99_n) = (m(ours, |r| r.p99_ms), m(theirs, |r| r.p99_ms));
        let errors_s: u64 = ours.iter().map(|r| r.errors).sum();
        let errors_n: u64 = theirs.iter().map(|r| r.errors).sum();
        let verdict = |ok: bool| if ok { "PASS" } else { "MISS" }.to_owned();
        t.row(vec![
            label.clone(),
            format!("{rps_s:.0}"),
            format!("{rps_n:.0}"),
            format!("{:.2}", rps_s / rps_n),
            verdict(rps_s >= rps_n),
            format!("{p50_s:.3}"),
            format!("{p50_n:.3}"),
            format!("{p99_s:.3}"),
            format!("{p99_n:.3}"),
            format!("{:.2}", p99_s / p99_n),
            verdict(p99_s <= p99_n),
            format!("{errors_s}/{errors_n}"),
        ]);
    }
    t.note(&format!(
        "wrk -t1 -c{} -d{}s --latency, {} alternating rounds per response; each proxy has one worker (sentinel `worker-threads 1`, nginx `worker_processes 1`) and keeps up to 64 idle keep-alive connections to the same upstream (a third nginx serving both responses from memory). Access logs off on both.",
        plan.connections,
        plan.duration.as_secs(),
        plan.rounds
    ));
    let mut tables = vec![t];
    if let Some(memory) = &results.memory {
        let Memory {
            ours: (sb, sa),
            theirs: (nb, na),
            first,
            all,
        } = *memory;
        let mut m = Table::new(
            "Resident memory with idle keep-alive client connections",
            &[
                "proxy",
                &format!("RSS with {first} (MiB)"),
                &format!("RSS with {all} (MiB)"),
                "per connection (KiB)",
                "target: sentinel <= nginx",
            ],
        );
        let per = |at_first: u64, at_all: u64| {
            at_all.saturating_sub(at_first) as f64 / (all - first).max(1) as f64
        };
        let (ps, pn) = (per(sb, sa), per(nb, na));
        m.row(vec![
            "sentinel".to_owned(),
            format!("{:.1}", sb as f64 / 1024.0),
            format!("{:.1}", sa as f64 / 1024.0),
            format!("{ps:.2}"),
            if ps <= pn { "PASS" } else { "MISS" }.to_owned(),
        ]);
        m.row(vec![
            "nginx (master + worker)".to_owned(),
            format!("{:.1}", nb as f64 / 1024.0),
            format!("{:.1}", na as f64 / 1024.0),
            format!("{pn:.2}"),
            String::new(),
        ]);
        m.note(&format!(
            "Connections opened one after another, each completing one request and then left idle, held open by this program; VmRSS from /proc one second after the {first}th and after the {all}th. Per connection: the growth between the two over the {} connections opened in between, so that what a proxy frees or keeps of its start-up (sentinel gives back freed memory once connections park; glibc keeps it otherwise) does not count for or against it.",
            all - first
        ));
        tables.push(m);
    }
    tables
}

/// The path of `nginx` and `wrk` versions, for the header.
pub fn versions() -> String {
    let nginx = Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    let wrk = Command::new("wrk")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            all.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default();
    format!("{nginx}; {wrk}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 10s test @ http://127.0.0.1:8080/small
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  200.00us   5.00ms   90.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    1.50ms
     99%    2.10ms
  400000 requests in 10.00s, 60.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  40000.12
Transfer/sec:      6.00MB
";
        let r = parse_wrk(text).expect("parses");
        assert!((r.rps - 40000.12).abs() < 1e-6);
        assert!((r.p50_ms - 0.812).abs() < 1e-9);
        assert!((r.p99_ms - 2.1).abs() < 1e-9);
        assert_eq!(r.errors, 7);
    }
}
