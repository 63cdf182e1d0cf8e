//! Debian packages the tests and benchmarks need, installed when missing.

use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::{is_root, run, step};

/// (command that proves the package is there, Debian package).
const TEST_PACKAGES: &[(&str, &str)] = &[("ip", "iproute2"), ("bpftool", "bpftool")];

/// What `cargo xtask bench xdp` compares against.
pub const BENCH_XDP_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("xdp-filter", "xdp-tools"),
    ("trafgen", "netsniff-ng"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
];

/// What `cargo xtask bench proxy` compares against and measures with.
pub const BENCH_PROXY_PACKAGES: &[(&str, &str)] = &[("nginx", "nginx"), ("wrk", "wrk")];

fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| std::path::Path::new(dir).join(command).exists())
}

/// Installs the Debian packages of `wanted` whose command is missing.
pub fn ensure(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        eprintln!(
            "    Debian packages present: {}",
            wanted
                .iter()
                .map(|(_, p)| *p)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}; install them with `apt-get install {}` (as root)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(", ")
    ));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

pub fn ensure_test_packages() -> Result<()> {
    step("Debian packages for the tests");
    ensure(TEST_PACKAGES)
}
