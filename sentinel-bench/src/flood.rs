//! CPU time per dropped packet under a bounded trafgen flood over a veth
//! pair, for each filter of [`Dropper::ALL`], in alternating rounds.
//!
//! trafgen (netsniff-ng) runs inside the namespace and sends a fixed count
//! of identical UDP frames from the namespace's address to the root-side
//! end, where the filter under test drops them. Two CPU figures per flood:
//!
//! - attributed: the sender's own CPU time (`wait4` rusage: user + system,
//!   which on this kernel's tick-based accounting includes the softirq
//!   work done in its context, where veth delivers and the filters run)
//!   plus every `ksoftirqd/N` thread's runtime delta (softirq work deferred
//!   there); other processes on the machine are not counted;
//! - system-wide: the delta of user + nice + system + irq + softirq over
//!   all CPUs in /proc/stat, which also counts whatever else runs.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use sentinel::{kernel::NewRule, net::RuleList};
use sentinel_tests::packet::Packet;

use crate::{
    cpu,
    filters::{self, Dropper},
    netns::NetNs,
    testrun::Ours,
};

/// Longest a flood may run before it is killed.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(120);

/// One flood.
#[derive(Debug, Clone)]
pub struct Flood {
    pub filter: Dropper,
    pub sent: u64,
    /// Counted by the filter itself; `None` for no filter.
    pub dropped: Option<u64>,
    pub wall: Duration,
    /// Sender rusage + ksoftirqd runtime.
    pub attributed: Duration,
    /// /proc/stat busy time, all CPUs.
    pub system_wide: Duration,
}

/// The frame trafgen sends, as a trafgen packet configuration.
fn trafgen_config(ns: &NetNs) -> Result<String> {
    let mut frame = Packet::ipv4(ns.peer_v4, ns.host_v4)
        .udp(40_000, 9)
        .payload(18)
        .build();
    frame[0..6].copy_from_slice(&ns.host_mac()?);
    frame[6..12].copy_from_slice(&ns.peer_mac()?);
    let bytes: Vec<String> = frame.iter().map(|b| format!("0x{b:02x}")).collect();
    Ok(format!("{{ {} }}\n", bytes.join(", ")))
}

/// Runs trafgen for `packets` frames; (sent, wall, sender CPU time).
fn trafgen(ns: &NetNs, config: &Path, packets: u64) -> Result<(u64, Duration, Duration)> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let out_path = dir.path().join("trafgen.out");
    let out = fs::File::create(&out_path)?;
    let count = packets.to_string();
    let config = config.to_string_lossy().into_owned();
    let started = Instant::now();
    let child = ns
        .command("trafgen")
        .args(["-o", &ns.peer_if, "-i", &config, "-n", &count, "-P", "1"])
        // Leave the machine's socket memory sysctls and IRQ affinities alone.
        .args(["--no-sock-mem", "-Q"])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("cannot run trafgen (Debian package netsniff-ng)")?;
    // `ip netns exec` execs trafgen in place: the child is trafgen.
    let pid = child.id() as libc::pid_t;
    let (status, usage) = wait4_within(pid, FLOOD_TIMEOUT)?;
    let wall = started.elapsed();
    let text = fs::read_to_string(&out_path).unwrap_or_default();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("trafgen failed (wait status {status}): {}", text.trim());
    }
    let sent = text
        .lines()
        .find(|l| l.contains("packets outgoing"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(packets);
    let cpu = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok((sent, wall, cpu(usage.ru_utime) + cpu(usage.ru_stime)))
}

/// Reaps our child `pid` with its resource usage, killing it after
/// `timeout`.
fn wait4_within(pid: libc::pid_t, timeout: Duration) -> Result<(i32, libc::rusage)> {
    let deadline = Instant::now() + timeout;
    let mut killed = false;
    loop {
        let mut status = 0;
        // SAFETY: zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if killed { 0 } else { libc::WNOHANG };
        // SAFETY: `pid` is our own child; status and usage are valid
        // out-pointers for the call.
        let rc = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
        if rc == pid {
            if killed {
                crate::interrupted()?;
                bail!("trafgen did not finish within {timeout:?}; killed");
            }
            return Ok((status, usage));
        }
        if rc < 0 {
            bail!("wait4(trafgen): {}", std::io::Error::last_os_error());
        }
        if (Instant::now() > deadline || crate::interrupted().is_err()) && !killed {
            // SAFETY: our own child, not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One flood of `packets` frames against `filter`.
fn flood(
    filter: Dropper,
    ns: &NetNs,
    config: &Path,
    packets: u64,
    ours: &mut Ours,
) -> Result<Flood> {
    let mut armed = filters::arm(filter, ns, ns.peer_v4, ours)?;
    let before_drops = armed.dropped()?;
    let before = cpu::snapshot()?;
    let (sent, wall, sender) = trafgen(ns, config, packets)?;
    let after = cpu::snapshot()?;
    let after_drops = armed.dropped()?;
    let dropped = match (before_drops, after_drops) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let softirqd = Duration::from_nanos(after.softirqd_ns.saturating_sub(before.softirqd_ns));
    Ok(Flood {
        filter,
        sent,
        dropped,
        wall,
        attributed: sender + softirqd,
        system_wide: after.busy_since(&before),
    })
}

/// `rounds` rounds over every filter (order rotating per round), each
/// flood `packets` frames.
pub fn run(ns: &NetNs, packets: u64, rounds: usize) -> Result<Vec<Flood>> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let config = dir.path().join("flood.cfg");
    fs::write(&config, trafgen_config(ns)?)
        .with_context(|| format!("cannot write {}", config.display()))?;
    let mut ours = Ours::load(1)?;
    let source: Ipv4Addr = ns.peer_v4;
    ours.kernel
        .tables
        .upsert(
            RuleList::Deny,
            &IpNet::from(std::net::IpAddr::V4(source)),
            &NewRule {
                ttl: None,
                source: "bench".into(),
                reason: "flood".into(),
            },
        )
        .context("cannot deny the flood's source")?;
    // Warm-up: page in trafgen, fill the neighbour and route caches.
    flood(Dropper::Nothing, ns, &config, packets / 20 + 1, &mut ours)?;
    let mut floods = Vec::new();
    for round in 0..rounds {
        let mut order = Dropper::ALL.to_vec();
        let len = order.len();
        order.rotate_left(round % len);
        for filter in order {
            crate::interrupted()?;
            eprintln!(
                "    round {}/{rounds}: {} x {packets}",
                round + 1,
                filter.label()
            );
            let result = flood(filter, ns, &config, packets, &mut ours)?;
            if let Some(dropped) = result.dropped
                && dropped < result.sent / 2
            {
                bail!(
                    "{} dropped only {dropped} of {} packets: the flood does not reach it",
                    filter.label(),
                    result.sent
                );
            }
            floods.push(result);
        }
    }
    Ok(floods)
}
