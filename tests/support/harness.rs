//! A loaded fast path with its own pin directory, for `BPF_PROG_TEST_RUN`
//! tests and benchmarks. Nothing is attached: packets come from test runs.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use ipnet::IpNet;
use sentinel::{
    config::KernelConfig,
    kernel::{Kernel, KernelError, NewRule, Upsert},
    net::{RuleList, validate_prefix},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// A kernel loaded under a unique pin path, removed on drop.
pub struct Harness {
    pub kernel: Kernel,
    pub pin_path: PathBuf,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique pin path under /sys/fs/bpf for this process.
pub fn unique_pin_path(tag: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/sentinel-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Harness {
    /// Loads with default capacities.
    pub fn new() -> Self {
        Self::with_config(|_| {})
    }

    /// Loads after `adjust` edits the kernel configuration.
    pub fn with_config(adjust: impl FnOnce(&mut KernelConfig)) -> Self {
        let mut cfg = KernelConfig {
            pin_path: unique_pin_path("t"),
            ..KernelConfig::default()
        };
        adjust(&mut cfg);
        // The steering program too (a daemon loads it only when steering is
        // configured), so that every program can be test-run.
        let kernel = match Kernel::open(&cfg).and_then(|mut k| k.load_steering().map(|()| k)) {
            Ok(k) => k,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&cfg.pin_path);
                panic!("cannot load the XDP program: {e}");
            }
        };
        Self {
            kernel,
            pin_path: cfg.pin_path,
        }
    }

    pub fn add(
        &mut self,
        list: RuleList,
        prefix: &str,
        ttl: Option<Duration>,
    ) -> Result<Upsert, KernelError> {
        let prefix = validate_prefix(prefix, list).expect("test prefix is valid");
        self.kernel.tables.upsert(
            list,
            &prefix,
            &NewRule {
                ttl,
                source: "test".into(),
                reason: "test".into(),
            },
        )
    }

    pub fn deny(&mut self, prefix: &str) {
        self.add(RuleList::Deny, prefix, None).expect("deny add");
    }

    pub fn allow(&mut self, prefix: &str) {
        self.add(RuleList::Allow, prefix, None).expect("allow add");
    }

    /// Runs `frame` once; returns the XDP action and the reason counted.
    pub fn run(&self, frame: &[u8]) -> (u32, String) {
        let before = self.kernel.control_stats();
        let (action, _) = self.kernel.test_run(frame, 1).expect("test run");
        let after = self.kernel.control_stats();
        let changed: Vec<&str> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.packets != b.packets)
            .map(|(_, a)| a.reason.as_str())
            .collect();
        assert_eq!(
            changed.len(),
            1,
            "exactly one reason must count a packet: {changed:?}"
        );
        let reason = changed[0].to_owned();
        let counted = after.iter().find(|r| r.reason == reason).expect("reason");
        let was = before.iter().find(|r| r.reason == reason).expect("reason");
        assert_eq!(counted.packets - was.packets, 1);
        assert_eq!(
            counted.bytes - was.bytes,
            frame.len() as u64,
            "bytes counted = frame length"
        );
        (action, reason)
    }

    /// The entry stored under exactly `prefix`.
    pub fn entry(&mut self, list: RuleList, prefix: &str) -> Option<sentinel_common::RuleValue> {
        let prefix: IpNet = prefix.parse().expect("prefix");
        self.kernel.tables.get(list, &prefix).expect("lookup")
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_path);
    }
}
