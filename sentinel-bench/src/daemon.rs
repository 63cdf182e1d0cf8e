//! The real `sentinel` daemon, started with a generated configuration in a
//! temporary directory, its own pin path and a kernel-chosen metrics port;
//! stopped (SIGTERM, then SIGKILL) and cleaned up on drop.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use sentinel::admin::{Request, Stats, client::Client};
use tempfile::TempDir;

use crate::bpf::PinDir;

/// How long the daemon may take to answer after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `cmd` to completion within `timeout`, killing it otherwise.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    let status = wait_within(&mut child, timeout).with_context(|| shown.clone())?;
    Ok(Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    })
}

/// Waits for `child`, killing it after `timeout`.
pub fn wait_within(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A running `sentinel run`.
pub struct Daemon {
    bin: PathBuf,
    child: Option<Child>,
    pub admin_socket: PathBuf,
    log_path: PathBuf,
    // Dropped after the process is gone (fields drop in order).
    _pins: PinDir,
    _dir: TempDir,
}

impl Daemon {
    /// Starts `bin run`, attached in native mode to `interface` if given,
    /// and waits until it answers on its admin socket.
    pub fn start(bin: &Path, interface: Option<&str>) -> Result<Self> {
        Self::start_with(bin, interface, "")
    }

    /// Like [`Daemon::start`], with `blocks` (more top-level configuration
    /// blocks, e.g. listeners and routes) appended to the file.
    pub fn start_with(bin: &Path, interface: Option<&str>, blocks: &str) -> Result<Self> {
        Self::start_in(bin, interface, "", blocks, None)
    }

    /// Like [`Daemon::start_with`], with `kernel` (more lines of the
    /// `kernel` block, e.g. `steering`) and, if `netns` is given, run
    /// inside that network namespace (a /run/netns file): whatever it
    /// attaches there (sk_lookup) stays out of the machine's namespace.
    pub fn start_in(
        bin: &Path,
        interface: Option<&str>,
        kernel_lines: &str,
        blocks: &str,
        netns: Option<&Path>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sentinel-bench-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let pins = PinDir::new("daemon");
        let admin_socket = dir.path().join("admin.sock");
        let config_path = dir.path().join("sentinel.kdl");
        let mut kernel = String::new();
        if let Some(interface) = interface {
            kernel.push_str(&format!(
                "    interfaces \"{interface}\"\n    xdp-mode \"native\"\n"
            ));
        }
        kernel.push_str(&format!("    pin-path \"{}\"\n", pins.path.display()));
        if !kernel_lines.is_empty() {
            kernel.push_str(kernel_lines);
            kernel.push('\n');
        }
        let text = format!(
            "kernel {{\n{kernel}}}\n\nadmin {{\n    socket \"{}\"\n}}\n\n\
             observability {{\n    metrics {{\n        address \"127.0.0.1:0\"\n    }}\n{}}}\n{blocks}",
            admin_socket.display(),
            if blocks.contains("listeners") {
                "    logging {\n        access-log #false\n    }\n"
            } else {
                ""
            },
        );
        fs::write(&config_path, text)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log_path = dir.path().join("daemon.log");
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        // Daemon starts may mount bpffs and write shared state: take the
        // lock the tests' daemons take (tests/support/daemon.rs).
        let lock = sentinel_tests::try_machine_lock("sentinel-tests-daemon.lock")
            .context("cannot lock /tmp/sentinel-tests-daemon.lock")?;
        let mut command = Command::new(bin);
        if let Some(path) = netns {
            use std::os::{fd::AsRawFd, unix::process::CommandExt};
            let ns = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: setns is async-signal-safe; the closure touches only
            // the descriptor, which it owns and which outlives the spawn.
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
            .arg(&config_path)
            .env_remove("SENTINEL_ADMIN_SOCKET")
            .env("SENTINEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut daemon = Self {
            bin: bin.to_owned(),
            child: Some(child),
            admin_socket,
            log_path,
            _pins: pins,
            _dir: dir,
        };
        daemon.wait_ready()?;
        drop(lock);
        Ok(daemon)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "the daemon exited with {status} at start; its log:\n{}",
                    self.log()
                );
            }
            if let Ok(mut client) = Client::connect(&self.admin_socket)
                && client
                    .call::<serde_json::Value>(&Request::Status {})
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not answer within {READY_TIMEOUT:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Process id of the daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The address a proxy listener is bound to, from `status`.
    pub fn listener(&self, name: &str) -> Result<std::net::SocketAddr> {
        let status: serde_json::Value = self.client()?.call(&Request::Status {})?;
        status["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l[0] == name))
            .and_then(|l| l[1].as_str())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("`status` lists no listener '{name}': {status}"))
    }

    /// The value of the unlabelled series `name` at `/metrics`.
    pub fn metric(&self, name: &str) -> Result<f64> {
        use std::io::{Read as _, Write as _};
        let status: serde_json::Value = self.client()?.call(&Request::Status {})?;
        let addr: std::net::SocketAddr = status["metrics_address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("`status` has no metrics address: {status}"))?;
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no {name} at /metrics"))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `sentinel --admin-socket <ours> <args>`, as a separate process.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--admin-socket")
            .arg(&self.admin_socket)
            .args(args)
            .env_remove("SENTINEL_ADMIN_SOCKET");
        cmd
    }

    /// Runs the CLI; fails (with the daemon's log) unless it succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> Result<Output> {
        let out = output_within(&mut self.cli_command(args), CLI_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "`sentinel {}` failed with {}: {}\ndaemon log:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log()
            );
        }
        Ok(out)
    }

    /// A client of the admin API (one connection, many requests).
    pub fn client(&self) -> Result<Client> {
        Client::connect(&self.admin_socket).context("cannot connect to the daemon")
    }
}

/// `stats`: entries in the denylist.
pub fn denylist_entries(client: &mut Client) -> Result<usize> {
    let stats: Stats = client
        .call(&Request::Stats {})
        .context("`stats` request failed")?;
    Ok(stats.denylist_entries)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill() with the pid of our own child, not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        if wait_within(&mut child, Duration::from_secs(15)).is_err() {
            eprintln!("warning: the daemon did not stop within 15 s of SIGTERM; killed it");
        }
    }
}
