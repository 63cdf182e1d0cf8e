//! CPU time as the kernel accounts it: /proc/stat for the whole machine,
//! /proc/<pid>/schedstat for the softirq threads.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// CPU counters at one instant.
pub struct Snapshot {
    /// user + nice + system + irq + softirq, all CPUs, in clock ticks.
    busy_ticks: u64,
    /// All of those plus idle, iowait and steal.
    total_ticks: u64,
    /// Runtime of every `ksoftirqd/N` (and threaded-NAPI `napi/...`)
    /// thread, in nanoseconds.
    pub softirqd_ns: u64,
}

impl Snapshot {
    /// Busy CPU time (all CPUs) between `earlier` and this snapshot.
    pub fn busy_since(&self, earlier: &Snapshot) -> Duration {
        ticks_to_duration(self.busy_ticks.saturating_sub(earlier.busy_ticks))
    }

    /// Share of all CPUs that was busy between `earlier` and this one.
    fn busy_fraction_since(&self, earlier: &Snapshot) -> f64 {
        let total = self.total_ticks.saturating_sub(earlier.total_ticks);
        let busy = self.busy_ticks.saturating_sub(earlier.busy_ticks);
        if total == 0 {
            0.0
        } else {
            busy as f64 / total as f64
        }
    }
}

pub fn snapshot() -> Result<Snapshot> {
    let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy_ticks = [0, 1, 2, 5, 6].iter().map(|&i| field(i)).sum();
    let total_ticks = (0..8).map(field).sum();
    let mut softirqd_ns = 0;
    for entry in fs::read_dir("/proc")
        .context("cannot list /proc")?
        .flatten()
    {
        let dir = entry.path();
        let is_softirqd = fs::read_to_string(dir.join("comm"))
            .is_ok_and(|c| c.starts_with("ksoftirqd/") || c.starts_with("napi/"));
        if is_softirqd {
            // First field: time spent on the CPU, in nanoseconds.
            softirqd_ns += fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(Snapshot {
        busy_ticks,
        total_ticks,
        softirqd_ns,
    })
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz)
}

/// Below this share of all CPUs busy, the machine counts as quiet.
const QUIET: f64 = 0.15;

/// Waits (at most `limit`) until two consecutive 300 ms windows are quiet:
/// freeing a million-entry map, for one, keeps a kworker and softirqs busy
/// for seconds after the map is gone, and timing-sensitive measurements
/// should not start inside that. Returns the last window's busy share.
pub fn settle(limit: Duration) -> Result<f64> {
    let deadline = Instant::now() + limit;
    let mut quiet_windows = 0;
    loop {
        crate::interrupted()?;
        let before = snapshot()?;
        std::thread::sleep(Duration::from_millis(300));
        let busy = snapshot()?.busy_fraction_since(&before);
        quiet_windows = if busy < QUIET { quiet_windows + 1 } else { 0 };
        if quiet_windows >= 2 || Instant::now() > deadline {
            return Ok(busy);
        }
    }
}
