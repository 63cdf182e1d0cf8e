//! The real `sentinel` binary, run as a daemon with a generated
//! configuration, and its client subcommands and `/metrics`.
//!
//! Every [`Daemon`] has its own temporary directory (configuration, admin
//! socket, log), its own pin path under `/sys/fs/bpf` and a metrics port
//! chosen by the kernel, so tests can run in parallel. Dropping it kills the
//! process if it still runs and removes the pinned maps and the directory.

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tempfile::TempDir;

/// How long the daemon may take to answer `status` after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long any one CLI call may take before the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon may take to exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The binary under test: `$SENTINEL_BIN`, else the workspace's debug build.
pub fn bin() -> PathBuf {
    let path = std::env::var_os("SENTINEL_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/sentinel"
            ))
        },
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} does not exist: run `cargo build -p sentinel-user` or set SENTINEL_BIN",
        path.display()
    );
    path
}

/// Runs `command` to completion, failing the test if it takes longer than
/// [`CLI_TIMEOUT`].
pub fn output(mut command: Command) -> Output {
    let shown = format!("{command:?}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(command.output());
    });
    match rx.recv_timeout(CLI_TIMEOUT) {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run {shown}: {e}"),
        Err(_) => panic!("{shown} did not finish within {CLI_TIMEOUT:?}"),
    }
}

/// The value of the series `name{labels}` in Prometheus text exposition
/// `text`. The label set must match exactly (order does not matter).
pub fn parse_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)?),
                None => (series, Vec::new()),
            };
            let same = series_name == name
                && series_labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v));
            if same {
                value.trim().parse().ok()
            } else {
                None
            }
        })
}

/// `k="v",k2="v2"` into pairs, unescaping `\"`, `\\` and `\n`.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        out.push((key.trim().to_owned(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

/// What to put in the generated configuration.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    /// `kernel.interfaces`; empty: the option is left out (nothing attached).
    pub interfaces: Vec<String>,
    /// `kernel.xdp-mode` (`auto`, `native`, `generic`); `None`: default.
    pub xdp_mode: Option<String>,
    /// More lines for the `kernel` block, e.g. `max-ttl-seconds 3600` or a
    /// `port-policy { ... }` block.
    pub kernel_extra: String,
    /// More lines for the `observability` block (whose metrics address the
    /// harness writes), e.g. `logging { format "json" }`.
    pub observability_extra: String,
    /// Top-level blocks appended to the file: `system`, `listeners`,
    /// `routes`, `upstreams`, `limits`.
    pub blocks: String,
    /// Run the daemon in this network namespace (its file under
    /// /run/netns) instead of the test's: what it attaches to its own
    /// namespace (sk_lookup steering) then stays inside the test's.
    pub netns: Option<PathBuf>,
}

impl DaemonConfig {
    /// Attached to `interface` in `mode`.
    pub fn attached(interface: &str, mode: &str) -> Self {
        Self {
            interfaces: vec![interface.to_owned()],
            xdp_mode: Some(mode.to_owned()),
            ..Self::default()
        }
    }

    /// With `lines` added to the `kernel` block.
    pub fn with_kernel(mut self, lines: &str) -> Self {
        self.kernel_extra.push_str(lines);
        self.kernel_extra.push('\n');
        self
    }

    /// With `lines` added to the `observability` block.
    pub fn with_observability(mut self, lines: &str) -> Self {
        self.observability_extra.push_str(lines);
        self.observability_extra.push('\n');
        self
    }

    /// Runs the daemon inside the namespace at `path`.
    pub fn in_netns(mut self, path: PathBuf) -> Self {
        self.netns = Some(path);
        self
    }

    /// With the top-level `blocks` appended to the file.
    pub fn with_blocks(mut self, blocks: &str) -> Self {
        self.blocks.push_str(blocks);
        self.blocks.push('\n');
        self
    }
}

/// A running (or stopped) `sentinel run`.
pub struct Daemon {
    child: Option<Child>,
    pub config_path: PathBuf,
    pub admin_socket: PathBuf,
    pub pin_path: PathBuf,
    log_path: PathBuf,
    metrics_address: Option<SocketAddr>,
    netns: Option<PathBuf>,
    // Last: removed after everything inside it is done with.
    dir: TempDir,
}

/// Serialises daemon starts in this machine's test processes: each start
/// loads programs and writes the port-policy map, and the first one may
/// mount bpffs, which two daemons must not do at once.
fn start_lock() -> File {
    crate::machine_lock("sentinel-tests-daemon.lock")
}

impl Daemon {
    /// Writes the configuration, starts the daemon and waits until it
    /// answers `status` (panicking with its log if it does not).
    pub fn start(config: DaemonConfig) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sentinel-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let unique = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/sentinel-test-{unique}"));
        let admin_socket = dir.path().join("admin.sock");
        let config_path = dir.path().join("sentinel.kdl");
        let mut kernel = String::new();
        if !config.interfaces.is_empty() {
            let names: Vec<String> = config
                .interfaces
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect();
            kernel.push_str(&format!("    interfaces {}\n", names.join(" ")));
        }
        if let Some(mode) = &config.xdp_mode {
            kernel.push_str(&format!("    xdp-mode \"{mode}\"\n"));
        }
        kernel.push_str(&format!("    pin-path \"{}\"\n", pin_path.display()));
        kernel.push_str(&config.kernel_extra);
        let text = format!(
            "kernel {{\n{kernel}}}\n\nadmin {{\n    socket \"{}\"\n}}\n\n\
             observability {{\n    metrics {{\n        address \"127.0.0.1:0\"\n    }}\n{}}}\n\n{}",
            admin_socket.display(),
            config.observability_extra,
            config.blocks,
        );
        fs::write(&config_path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let mut daemon = Daemon {
            child: None,
            log_path: dir.path().join("daemon.log"),
            config_path,
            admin_socket,
            pin_path,
            metrics_address: None,
            netns: config.netns.clone(),
            dir,
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        let _lock = start_lock();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let mut command = Command::new(bin());
        if let Some(path) = &self.netns {
            use std::os::{fd::AsRawFd, unix::process::CommandExt};
            let ns =
                File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            // SAFETY: setns is async-signal-safe; the closure touches only
            // the descriptor, which outlives the spawn below.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("SENTINEL_ADMIN_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin().display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "the daemon exited with {status} at start; its log:\n{}",
                    self.log()
                );
            }
            let out = self.cli(&["status", "--json"]);
            if out.status.success() {
                let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!("`status --json` printed invalid JSON ({e}): {out:?}")
                });
                self.metrics_address = status["metrics_address"]
                    .as_str()
                    .and_then(|a| a.parse().ok());
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the daemon did not answer `status` within {READY_TIMEOUT:?}; last answer: {}\nits log:\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The temporary directory holding configuration, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the daemon wrote to stderr, over all its runs.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The proxy listeners and their bound addresses, from `status --json`.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        let status = self.status();
        status["listeners"]
            .as_array()
            .unwrap_or_else(|| panic!("`status --json` has no listener list: {status}"))
            .iter()
            .map(|pair| {
                let name = pair[0].as_str();
                let addr = pair[1].as_str().and_then(|a| a.parse().ok());
                match (name, addr) {
                    (Some(n), Some(a)) => (n.to_owned(), a),
                    _ => panic!("`status --json` lists a listener as {pair}"),
                }
            })
            .collect()
    }

    /// The address the proxy listener `name` is bound to.
    pub fn listener(&self, name: &str) -> SocketAddr {
        let listeners = self.listeners();
        listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener '{name}' in `status --json`: {listeners:?}"))
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `sentinel --admin-socket <this daemon's> <args>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(bin());
        command
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .args(args)
            .env_remove("SENTINEL_ADMIN_SOCKET")
            .stdin(Stdio::null());
        output(command)
    }

    /// Like [`Daemon::cli`], failing the test unless it succeeds; its
    /// standard output.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`sentinel {}` failed with {}: {}\ndaemon log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like [`Daemon::cli_ok`], parsing the output as JSON.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let text = self.cli_ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "`sentinel {}` printed invalid JSON ({e}): {text}",
                args.join(" ")
            )
        })
    }

    /// `sentinel status --json`.
    pub fn status(&self) -> Value {
        self.cli_json(&["status", "--json"])
    }

    /// `sentinel stats --json`.
    pub fn stats(&self) -> Value {
        self.cli_json(&["stats", "--json"])
    }

    /// `sentinel deny list --json`.
    pub fn deny_list(&self) -> Vec<Value> {
        match self.cli_json(&["deny", "list", "--json"]) {
            Value::Array(entries) => entries,
            other => panic!("`deny list --json` is not an array: {other}"),
        }
    }

    /// The XDP mode `stats --json` reports for `interface`.
    pub fn mode(&self, interface: &str) -> String {
        let stats = self.stats();
        stats["interfaces"]
            .as_array()
            .and_then(|ifaces| ifaces.iter().find(|i| i["interface"] == interface))
            .and_then(|i| i["mode"].as_str())
            .unwrap_or_else(|| panic!("`stats --json` does not list {interface}: {stats}"))
            .to_owned()
    }

    /// (packets, bytes) that `stats --json` reports for `interface` and
    /// `reason`.
    pub fn counters(&self, interface: &str, reason: &str) -> (u64, u64) {
        let stats = self.stats();
        let found = stats["interfaces"]
            .as_array()
            .and_then(|ifaces| ifaces.iter().find(|i| i["interface"] == interface))
            .and_then(|i| i["reasons"].as_array())
            .and_then(|rs| rs.iter().find(|r| r["reason"] == reason));
        match found {
            Some(r) => (
                r["packets"].as_u64().unwrap_or(u64::MAX),
                r["bytes"].as_u64().unwrap_or(u64::MAX),
            ),
            None => panic!("`stats --json` has no {interface}/{reason}: {stats}"),
        }
    }

    /// The bound metrics address that `status --json` reported.
    pub fn metrics_address(&self) -> SocketAddr {
        self.metrics_address
            .unwrap_or_else(|| panic!("the daemon reported no metrics address"))
    }

    /// `GET /metrics`: the body of a 200 response.
    pub fn metrics(&self) -> String {
        let addr = self.metrics_address();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("cannot connect to metrics at {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("set a read timeout");
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap_or_else(|e| panic!("cannot send the metrics request: {e}"));
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .unwrap_or_else(|e| panic!("cannot read the metrics response: {e}"));
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("malformed HTTP response: {response}"));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "GET /metrics answered: {head}"
        );
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "unexpected chunked metrics response: {head}"
        );
        body.to_owned()
    }

    /// The value of the series `name{labels}` at `/metrics` now.
    pub fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse_metric(&self.metrics(), name, labels)
    }

    /// Sends `signal` (SIGHUP to reload, SIGTERM to stop) without waiting.
    pub fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("the daemon is not running");
        // SAFETY: kill() with the pid of a child we have not reaped yet.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    fn signal_and_wait(&mut self, signal: libc::c_int) -> ExitStatus {
        self.signal(signal);
        self.wait_exit(signal)
    }

    /// Waits for the daemon to exit after `signal` was sent; its status.
    pub fn wait_exit(&mut self, signal: libc::c_int) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon is not running");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the daemon did not exit within {EXIT_TIMEOUT:?} of signal {signal} ({other:?}); its log:\n{}",
                        self.log()
                    );
                }
            }
        }
    }

    /// SIGTERM, then waits for the exit; its status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// SIGKILL, then waits for the exit: a crash, with no cleanup.
    pub fn kill9(&mut self) {
        self.signal_and_wait(libc::SIGKILL);
    }

    /// Starts the daemon again with the same configuration and pin path.
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}--- end of daemon log ---",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = fs::remove_dir_all(&self.pin_path);
    }
}
