//! Time from `sentinel deny add` returning to the next packet from that
//! source being dropped.
//!
//! The daemon is attached in native mode to the root-side end of a veth
//! pair. A thread inside the namespace sends UDP datagrams to the root-side
//! address in a tight loop. Each repetition removes the entry, waits until
//! packets pass again, runs `sentinel deny add <sender>/32` as a separate
//! process, and from the instant that process is reaped reads the
//! denylist drop counter of the daemon's attached program until it moves.
//!
//! The counter is the one `sentinel stats` reports (the per-CPU
//! `XDP_STATS` map of the program instance attached to the interface), read
//! with `BPF_MAP_LOOKUP_ELEM` straight from the kernel rather than through
//! the admin API: a poll then costs a syscall instead of a round trip
//! through the daemon, and, on two CPUs, a poller and a daemon thread
//! ping-ponging would take both CPUs from the sender and measure the
//! scheduler instead. Each poll's own duration bounds the resolution, so it
//! is measured and reported beside the latency. Between reads the poller
//! yields its CPU, so that softirq work deferred to ksoftirqd is not held
//! up by the measurement itself.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsFd,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;
use sentinel_common::{maps, reason};

use crate::{
    bpf,
    daemon::Daemon,
    netns::{self, NetNs},
};

/// Longest wait for any one expected change.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Discard port; a socket of ours listens there in the root namespace and
/// is never read, so passed datagrams end in its full receive queue and
/// provoke no ICMP errors (whose neighbour resolution would add frames).
const PORT: u16 = 9;

pub struct Latency {
    /// `deny add` reaped -> first poll that saw the denylist counter move.
    pub after_return: Vec<Duration>,
    /// `deny add` spawned -> the same instant.
    pub after_start: Vec<Duration>,
    /// Round trip of every counter poll (the measurement's resolution).
    pub polls: Vec<Duration>,
    /// Repetitions where the very first poll after the CLI returned already
    /// saw the drop.
    pub first_poll: usize,
    /// Datagrams per second the sender managed over the whole run.
    pub send_rate: f64,
    /// Datagrams the sender got out between the CLI's exit and the first
    /// drop seen, per repetition: when this is 0 or 1, the wait was for
    /// the sender's next datagram, not for the rule.
    pub sent_between: Vec<u64>,
    /// Frames the program passed between the CLI's exit and a moment
    /// [`SETTLE`] after the first drop, over all repetitions: 0 means the
    /// entry was in force before `deny add` returned.
    pub passed_after: u64,
}

/// How long to keep watching the pass counter after the first drop.
const SETTLE: Duration = Duration::from_millis(20);

/// Sets the flag on drop, so the sender stops on every exit path.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The per-CPU counters of the program attached to an interface.
struct AttachedCounters {
    map: MapData,
    cpus: usize,
}

impl AttachedCounters {
    /// Finds the `XDP_STATS` map of the XDP program attached to `interface`.
    fn find(interface: &str) -> Result<Self> {
        let text = netns::ip(&["-j", "-d", "link", "show", "dev", interface])?;
        let json: serde_json::Value =
            serde_json::from_str(&text).context("`ip -j link` printed invalid JSON")?;
        let xdp = &json[0]["xdp"];
        let prog_id = xdp["prog"]["id"]
            .as_u64()
            .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("no XDP program is attached to {interface}"))?;
        let program = aya::programs::loaded_programs()
            .flatten()
            .find(|p| p.id() == prog_id)
            .with_context(|| format!("program {prog_id} is not loaded"))?;
        let ids = program
            .map_ids()
            .context("cannot list the program's maps")?
            .unwrap_or_default();
        for id in ids {
            let map = MapData::from_id(id).context("cannot open a map of the program")?;
            let name = map
                .info()
                .ok()
                .and_then(|i| i.name_as_str().map(str::to_owned));
            if name.as_deref() == Some(maps::STATS) {
                let cpus = bpf::possible_cpus().context("cannot count the possible CPUs")?;
                return Ok(Self { map, cpus });
            }
        }
        bail!(
            "program {prog_id} on {interface} has no {} map",
            maps::STATS
        )
    }

    /// Packets counted for `reason` on all CPUs.
    fn packets(&self, reason: u32) -> Result<u64> {
        // struct Counters { u64 packets; u64 bytes; } per CPU.
        let mut value = vec![0u8; 16 * self.cpus];
        bpf::lookup_elem(self.map.fd().as_fd(), &reason.to_ne_bytes(), &mut value)
            .context("cannot read the XDP counters")?;
        Ok(value
            .chunks_exact(16)
            .map(|slot| u64::from_ne_bytes(slot[..8].try_into().unwrap_or_default()))
            .sum())
    }

    fn wait_above(&self, what: &str, reason: u32, above: u64) -> Result<u64> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            crate::interrupted()?;
            let now = self.packets(reason)?;
            if now > above {
                return Ok(now);
            }
            if Instant::now() > deadline {
                bail!("{what}: the counter stayed at {now} for {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Runs the CLI and, the moment it has exited, `then`; returns the instants
/// it was spawned and exited, and what `then` returned. The exit is
/// observed by a blocking `waitid(WNOWAIT)` on this thread, so the instant
/// is quantised neither by a polling interval nor by a thread wake-up; the
/// child is reaped after `then`. A watchdog kills it after [`TIMEOUT`].
fn timed_cli<T>(
    daemon: &Daemon,
    args: &[&str],
    then: impl FnOnce(Instant) -> Result<T>,
) -> Result<(Instant, Instant, T)> {
    let shown = format!("`sentinel {}`", args.join(" "));
    let mut cmd = daemon.cli_command(args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot run the sentinel CLI")?;
    let pid = child.id();
    // Set once the child may be reaped; the watchdog only kills while it
    // holds the lock and the flag is clear, so it never signals a reaped
    // (possibly reused) pid.
    let reaping = Arc::new(Mutex::new(false));
    let watchdog = {
        let reaping = reaping.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(10));
                let done = reaping.lock().unwrap_or_else(|p| p.into_inner());
                if *done {
                    return;
                }
                if started.elapsed() > TIMEOUT {
                    // SAFETY: our own child, not reaped (see `reaping`).
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                    return;
                }
            }
        })
    };
    let exited = loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child without reaping it (WNOWAIT).
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: waitid filled `info` for a child state change.
            let ok = info.si_code == libc::CLD_EXITED && unsafe { info.si_status() } == 0;
            break Ok((Instant::now(), ok));
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            break Err(error);
        }
    };
    let after = match &exited {
        Ok((at, true)) => Some(then(*at)),
        _ => None,
    };
    *reaping.lock().unwrap_or_else(|p| p.into_inner()) = true;
    let status = child.wait();
    let _ = watchdog.join();
    let (exited_at, _) = exited.with_context(|| format!("cannot wait for {shown}"))?;
    let status = status.with_context(|| format!("cannot wait for {shown}"))?;
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        bail!("{shown} failed with {status}: {}", stderr.trim());
    }
    let value = after.with_context(|| format!("{shown} did not exit cleanly"))??;
    Ok((started, exited_at, value))
}

pub fn run(bin: &std::path::Path, ns: &NetNs, repeats: usize) -> Result<Latency> {
    let daemon = Daemon::start(bin, Some(&ns.host_if))?;
    let counters = AttachedCounters::find(&ns.host_if)?;
    let target = SocketAddr::new(ns.host_ip(), PORT);
    let _sink = UdpSocket::bind(target).with_context(|| format!("cannot bind {target}"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let _stop = StopOnDrop(stop.clone());
    let source = SocketAddr::new(ns.peer_ip(), 0);
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        ns.spawn(move || {
            let socket = UdpSocket::bind(source)
                .with_context(|| format!("cannot bind a UDP socket to {source}"))?;
            let payload = [0u8; 18];
            while !stop.load(Ordering::Relaxed) {
                if socket.send_to(&payload, target).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })
    };
    let began = Instant::now();

    let measured = (|| -> Result<Latency> {
        counters.wait_above("sender start", reason::PASS, 0)?;
        let cidr = format!("{}/32", ns.peer_v4);
        let mut out = Latency {
            after_return: Vec::new(),
            after_start: Vec::new(),
            polls: Vec::new(),
            first_poll: 0,
            send_rate: 0.0,
            passed_after: 0,
            sent_between: Vec::new(),
        };
        for round in 0..repeats {
            crate::interrupted()?;
            if round > 0 {
                daemon.cli_ok(&["deny", "remove", &cidr])?;
            }
            // Packets pass again: the entry is gone from the map.
            let passed = counters.packets(reason::PASS)?;
            counters.wait_above("after remove", reason::PASS, passed + 100)?;
            let dropped = counters.packets(reason::DENYLIST)?;
            let polls_taken = &mut out.polls;
            let sent_now = &sent;
            let (started, returned, (seen, polls, passed_at_return, sent_between)) =
                timed_cli(&daemon, &["deny", "add", &cidr], |returned| {
                    let sent_at_return = sent_now.load(Ordering::Relaxed);
                    let passed = counters.packets(reason::PASS)?;
                    let mut polls = 0;
                    loop {
                        let t = Instant::now();
                        let now = counters.packets(reason::DENYLIST)?;
                        let done = Instant::now();
                        polls_taken.push(done - t);
                        polls += 1;
                        if now > dropped {
                            let between = sent_now
                                .load(Ordering::Relaxed)
                                .saturating_sub(sent_at_return);
                            return Ok((done, polls, passed, between));
                        }
                        if done - returned > TIMEOUT {
                            bail!(
                                "no packet from {cidr} was dropped within {TIMEOUT:?} of `deny add`"
                            );
                        }
                        // Let ksoftirqd (which runs veth's NAPI when
                        // softirqs are deferred) have this CPU if it wants
                        // it: a spinning poller on two CPUs would delay the
                        // very drop it waits for.
                        std::thread::yield_now();
                    }
                })?;
            std::thread::sleep(SETTLE);
            out.passed_after += counters
                .packets(reason::PASS)?
                .saturating_sub(passed_at_return);
            out.sent_between.push(sent_between);
            if polls == 1 {
                out.first_poll += 1;
            }
            out.after_return.push(seen - returned);
            out.after_start.push(seen - started);
        }
        Ok(out)
    })();

    stop.store(true, Ordering::Relaxed);
    let elapsed = began.elapsed();
    let sender_result = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))?;
    sender_result.context("the sender failed")?;
    let mut out = measured?;
    out.send_rate = sent.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    Ok(out)
}
