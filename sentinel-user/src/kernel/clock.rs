//! Clocks shared with the program.
//!
//! Expiry times are `CLOCK_BOOTTIME` nanoseconds, which is what
//! `bpf_ktime_get_boot_ns` reads in the kernel: unlike `CLOCK_MONOTONIC` it
//! keeps counting through suspend, so a TTL means wall time elapsed. Pinned
//! maps do not survive a reboot, so a boot-relative clock is enough.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `CLOCK_BOOTTIME` in nanoseconds.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The wall-clock time of a `CLOCK_BOOTTIME` instant in the past.
pub fn boot_to_wall(boot_ns: u64) -> SystemTime {
    let ago = boottime_ns().saturating_sub(boot_ns);
    SystemTime::now() - Duration::from_nanos(ago)
}
