//! The peer: xdp-filter, from Debian's xdp-tools.
//!
//! xdp-filter matches exact IPv4 and IPv6 addresses in two per-CPU hash
//! maps, `filter_ipv4` (key: the address, network order) and `filter_ipv6`
//! (key: `struct in6_addr`), whose per-CPU value holds flag bits
//! (`1` = match as source) and a hit counter in the upper bits; that is what
//! `xdp-filter ip ADDR --mode src` writes, as `bpftool map dump` shows.
//! Its object files ship with libxdp1 (`xdpfilt_alw_ip.o` is the allow
//! policy with the `ipv4,ipv6` features) and declare those maps with
//! 10,000 entries, which `xdp-filter load` cannot change.
//!
//! Two ways to run it here:
//! - [`PeerProgram`]: the same object, loaded with aya with both maps sized
//!   for the entries under test (the only way to give it 100k or 1M
//!   addresses), pinned in a directory of our own, run with
//!   `BPF_PROG_TEST_RUN`;
//! - [`StockXdpFilter`]: `xdp-filter load` on an interface, as an operator
//!   would, for floods and to cross-check [`PeerProgram`].

use std::{
    fs,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};

use crate::bpf::{self, PinDir};

/// The program xdp-filter loads for `-f ipv4,ipv6` with the allow policy.
pub const PROGRAM: &str = "xdpfilt_alw_ip";
/// Capacity of xdp-filter's address maps as shipped.
pub const STOCK_CAPACITY: u32 = 10_000;
/// Where `xdp-filter` pins its maps.
const STOCK_PIN_DIR: &str = "/sys/fs/bpf/xdp-filter";
/// Value flag: match the address as a source.
const MAP_FLAG_SRC: u64 = 1;
/// Key of XDP_DROP in `xdp_stats_map` (indexed by XDP action).
const XDP_DROP: u32 = 1;

/// Finds `xdpfilt_alw_ip.o` where libxdp installs it.
pub fn object_path() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("LIBXDP_OBJECT_PATH") {
        dirs.push(dir.into());
    }
    if let Ok(lib) = fs::read_dir("/usr/lib") {
        dirs.extend(lib.flatten().map(|e| e.path().join("bpf")));
    }
    dirs.push("/usr/lib/bpf".into());
    dirs.push("/usr/local/lib/bpf".into());
    let file = format!("{PROGRAM}.o");
    dirs.iter()
        .map(|d| d.join(&file))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("cannot find {file} (installed by libxdp1, a dependency of xdp-tools)")
        })
}

/// Keys and per-CPU values for `addrs`, in the layout of the map of their
/// family. Returns (key size, value size, keys, values).
fn encode(addrs: &[IpAddr], v6: bool, cpus: usize) -> (usize, usize, Vec<u8>, Vec<u8>) {
    let key_size = if v6 { 16 } else { 4 };
    let value_size = 8 * cpus;
    let mut keys = Vec::with_capacity(addrs.len() * key_size);
    for addr in addrs {
        match addr {
            IpAddr::V4(a) if !v6 => keys.extend_from_slice(&a.octets()),
            IpAddr::V6(a) if v6 => keys.extend_from_slice(&a.octets()),
            _ => {}
        }
    }
    let count = keys.len() / key_size;
    let one: Vec<u8> = (0..cpus).flat_map(|_| MAP_FLAG_SRC.to_ne_bytes()).collect();
    let values = one.repeat(count);
    (key_size, value_size, keys, values)
}

/// Writes `addrs` (one family) into the address map pinned in `dir`.
fn fill_pinned(dir: &Path, addrs: &[IpAddr]) -> Result<()> {
    let v6 = addrs.first().is_some_and(IpAddr::is_ipv6);
    let name = if v6 { "filter_ipv6" } else { "filter_ipv4" };
    let path = dir.join(name);
    let fd = bpf::obj_get(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let cpus = bpf::possible_cpus().context("cannot count the possible CPUs")?;
    let (key_size, value_size, keys, values) = encode(addrs, v6, cpus);
    bpf::update_many(fd.as_fd(), key_size, value_size, &keys, &values).with_context(|| {
        format!(
            "cannot write {} entries into {}",
            addrs.len(),
            path.display()
        )
    })
}

/// Packets counted as XDP_DROP in the `xdp_stats_map` pinned in `dir`.
fn drops_pinned(dir: &Path) -> Result<u64> {
    let path = dir.join("xdp_stats_map");
    let fd = bpf::obj_get(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let cpus = bpf::possible_cpus().context("cannot count the possible CPUs")?;
    // struct xdp_stats_record { __u64 packets; __u64 bytes; } per CPU.
    let mut value = vec![0u8; 16 * cpus];
    bpf::lookup_elem(fd.as_fd(), &XDP_DROP.to_ne_bytes(), &mut value)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(value
        .chunks_exact(16)
        .map(|slot| u64::from_ne_bytes(slot[..8].try_into().unwrap_or_default()))
        .sum())
}

fn test_run(program: &Xdp, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN of xdp-filter's program failed")?;
    Ok((result.return_value, result.duration))
}

/// xdp-filter's program loaded from its object with address maps of
/// `capacity` entries, never attached.
pub struct PeerProgram {
    ebpf: Ebpf,
    pins: PinDir,
}

impl PeerProgram {
    pub fn load(capacity: u32) -> Result<Self> {
        let object = object_path()?;
        let pins = PinDir::new("xdpfilt");
        fs::create_dir_all(&pins.path)
            .with_context(|| format!("cannot create {}", pins.path.display()))?;
        // Its maps are declared pinned by name: pin them in our directory,
        // never in xdp-filter's own or at the bpffs root.
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins.path)
            .map_max_entries("filter_ipv4", capacity)
            .map_max_entries("filter_ipv6", capacity)
            .load_file(&object)
            .with_context(|| format!("cannot load {}", object.display()))?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("{} has no program {PROGRAM}", object.display()))?
            .try_into()
            .context("xdp-filter's program is not an XDP program")?;
        program
            .load()
            .context("the kernel rejected xdp-filter's program")?;
        Ok(Self { ebpf, pins })
    }

    /// Adds `addrs` (one family) as source matches.
    pub fn fill(&self, addrs: &[IpAddr]) -> Result<()> {
        fill_pinned(&self.pins.path, addrs)
    }

    /// `BPF_PROG_TEST_RUN`: (XDP action, mean time per run).
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .context("xdp-filter's program is gone")?
            .try_into()
            .context("xdp-filter's program is not an XDP program")?;
        test_run(program, frame, repeat)
    }
}

/// Runs `xdp-filter` with `args`, failing with its output.
fn xdp_filter(args: &[&str]) -> Result<()> {
    let out = Command::new("xdp-filter")
        .args(args)
        .output()
        .context("cannot run xdp-filter (Debian package xdp-tools)")?;
    if !out.status.success() {
        bail!(
            "`xdp-filter {}` failed with {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// `xdp-filter load IFACE` as an operator runs it; `xdp-filter unload` on
/// drop (which also removes its pinned maps once no interface uses them).
pub struct StockXdpFilter {
    interface: String,
}

impl StockXdpFilter {
    /// Loads in `mode` (`native` or `skb`) with the `ipv4,ipv6` features.
    pub fn load(interface: &str, mode: &str) -> Result<Self> {
        if Path::new(STOCK_PIN_DIR).join("programs").exists() {
            let busy: Vec<String> = fs::read_dir(Path::new(STOCK_PIN_DIR).join("programs"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if !busy.is_empty() {
                bail!(
                    "xdp-filter is already loaded on {} by someone else; its maps are shared by every interface, so this benchmark would disturb it",
                    busy.join(", ")
                );
            }
        }
        xdp_filter(&["load", interface, "--mode", mode, "-f", "ipv4,ipv6"])?;
        Ok(Self {
            interface: interface.to_owned(),
        })
    }

    /// `xdp-filter ip ADDR --mode src`.
    pub fn deny(&self, addr: IpAddr) -> Result<()> {
        xdp_filter(&["ip", &addr.to_string(), "--mode", "src"])
    }

    /// Adds many source addresses (one family) straight into its pinned map.
    pub fn fill(&self, addrs: &[IpAddr]) -> Result<()> {
        if addrs.len() > STOCK_CAPACITY as usize {
            bail!(
                "xdp-filter's maps hold {STOCK_CAPACITY} addresses; {} asked",
                addrs.len()
            );
        }
        fill_pinned(Path::new(STOCK_PIN_DIR), addrs)
    }

    /// Packets it has dropped (its stats map, all interfaces, all CPUs).
    pub fn drops(&self) -> Result<u64> {
        drops_pinned(Path::new(STOCK_PIN_DIR))
    }

    /// `BPF_PROG_TEST_RUN` of the program it attached (what `bpftool prog
    /// run pinned ...` does).
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let pinned = Path::new(STOCK_PIN_DIR)
            .join("programs")
            .join(&self.interface)
            .join(PROGRAM);
        let fd =
            bpf::obj_get(&pinned).with_context(|| format!("cannot open {}", pinned.display()))?;
        let (action, ns) = bpf::prog_test_run(fd.as_fd(), frame, repeat.max(1))
            .context("BPF_PROG_TEST_RUN of xdp-filter's program failed")?;
        Ok((action, Duration::from_nanos(u64::from(ns))))
    }
}

impl Drop for StockXdpFilter {
    fn drop(&mut self) {
        if let Err(e) = xdp_filter(&["unload", &self.interface]) {
            eprintln!("warning: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_network_order_keys_and_per_cpu_flags() {
        let addrs: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))];
        let (ks, vs, keys, values) = encode(&addrs, false, 2);
        assert_eq!((ks, vs), (4, 16));
        assert_eq!(keys, vec![192, 0, 2, 7]);
        assert_eq!(values.len(), 16);
        assert_eq!(
            u64::from_ne_bytes(values[8..16].try_into().unwrap_or_default()),
            1
        );
    }
}
