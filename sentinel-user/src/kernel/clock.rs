//! Clocks shared with the program.
//!
//! Expiry and last-hit times are `CLOCK_MONOTONIC_COARSE` nanoseconds: what
//! `bpf_ktime_get_coarse_ns` reads in the kernel, without the clock-source
//! read the precise clocks need on every packet that hits an entry. Its
//! resolution is a tick (1-4 ms). It stops while the machine is suspended,
//! so a TTL counts running time; pinned maps do not survive a reboot, so a
//! boot-relative clock is enough.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The program's clock, in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The wall-clock time of an instant of [`now_ns`] in the past.
pub fn to_wall(ns: u64) -> SystemTime {
    let ago = now_ns().saturating_sub(ns);
    SystemTime::now() - Duration::from_nanos(ago)
}
