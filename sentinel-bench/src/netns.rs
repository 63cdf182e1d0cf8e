//! A throwaway network namespace joined to the root namespace by a veth
//! pair, for the benchmarks that send real packets.
//!
//! The root-side end is where filters attach; the end inside the namespace
//! is where senders run. Both get a /30 from 203.0.113.0/24 (RFC 5737),
//! allocated under the same machine-wide lock file as the tests' namespaces
//! (tests/support/netns.rs) and skipping addresses already configured, so a
//! benchmark and a test run can share the machine. Everything is removed on
//! drop, also after an error.

use std::{
    fs::{self, File},
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Runs `ip` with `args`; its stdout, or an error with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (Debian package iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_exists(name: &str) -> bool {
    PathBuf::from("/sys/class/net").join(name).exists()
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// IPv4 addresses configured in the root namespace.
fn root_v4_addresses() -> Result<Vec<Ipv4Addr>> {
    Ok(ip(&["-o", "-4", "addr", "show"])?
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect())
}

/// A namespace with a veth pair; removed on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
    /// The end in the root namespace (filters attach here).
    pub host_if: String,
    /// The end inside the namespace (senders use it).
    pub peer_if: String,
    pub host_v4: Ipv4Addr,
    pub peer_v4: Ipv4Addr,
}

impl NetNs {
    /// Creates the namespace, the pair and the addresses; waits for carrier.
    pub fn new() -> Result<Self> {
        let pid = std::process::id();
        let lock = sentinel_tests::try_machine_lock("sentinel-tests-netns.lock")
            .context("cannot lock /tmp/sentinel-tests-netns.lock")?;
        let taken = root_v4_addresses()?;
        let name = format!("sentinel-bench-{pid}");
        let host_if = format!("sbh{}", pid % 1_000_000);
        let peer_if = format!("sbp{}", pid % 1_000_000);
        if link_exists(&host_if) || netns_path(&name).exists() {
            bail!("{host_if} or namespace {name} already exists");
        }
        // From the top of 203.0.113.0/24 down: the tests start elsewhere.
        let slot = (0..64u8).rev().find(|slot| {
            let base = slot * 4;
            ![base + 1, base + 2]
                .iter()
                .any(|h| taken.contains(&Ipv4Addr::new(203, 0, 113, *h)))
        });
        let Some(slot) = slot else {
            bail!("no free /30 left in 203.0.113.0/24");
        };
        let ns = NetNs {
            name,
            host_if,
            peer_if,
            host_v4: Ipv4Addr::new(203, 0, 113, slot * 4 + 1),
            peer_v4: Ipv4Addr::new(203, 0, 113, slot * 4 + 2),
        };
        // From here, dropping `ns` removes whatever was created.
        ns.create()?;
        drop(lock);
        ns.wait_up()?;
        Ok(ns)
    }

    fn create(&self) -> Result<()> {
        let (name, host, peer) = (&self.name, &self.host_if, &self.peer_if);
        ip(&["netns", "add", name])?;
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", peer, "netns", name,
        ])?;
        ip(&["addr", "add", &format!("{}/30", self.host_v4), "dev", host])?;
        ip(&["link", "set", host, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{}/30", self.peer_v4),
            "dev",
            peer,
        ])?;
        ip(&["-n", name, "link", "set", peer, "up"])?;
        Ok(())
    }

    fn wait_up(&self) -> Result<()> {
        let operstate = PathBuf::from("/sys/class/net")
            .join(&self.host_if)
            .join("operstate");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = fs::read_to_string(&operstate).unwrap_or_default();
            if state.trim() == "up" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "veth {} is still '{}' after 10 s",
                    self.host_if,
                    state.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// MAC address of the root-side end.
    pub fn host_mac(&self) -> Result<[u8; 6]> {
        let path = PathBuf::from("/sys/class/net")
            .join(&self.host_if)
            .join("address");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        parse_mac(text.trim()).with_context(|| format!("bad MAC address '{}'", text.trim()))
    }

    /// MAC address of the end inside the namespace.
    pub fn peer_mac(&self) -> Result<[u8; 6]> {
        let out = ip(&["-n", &self.name, "-o", "link", "show", "dev", &self.peer_if])?;
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no link/ether in `{}`", out.trim()))?;
        parse_mac(mac).with_context(|| format!("bad MAC address '{mac}'"))
    }

    /// `ip netns exec <name> <program>`: a command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a new thread that has joined the namespace (sockets it
    /// opens live there).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let path = netns_path(&self.name);
        std::thread::spawn(move || {
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: `file` is an open network namespace file; setns moves
            // only this thread, which ends with `f`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!(
                    "setns({}): {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            drop(file);
            f()
        })
    }

    pub fn host_ip(&self) -> IpAddr {
        IpAddr::V4(self.host_v4)
    }

    pub fn peer_ip(&self) -> IpAddr {
        IpAddr::V4(self.peer_v4)
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting either end deletes both.
        if link_exists(&self.host_if) {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_if])
                .output();
        }
        if netns_path(&self.name).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("06:f6:65:97:d0:d0"),
            Some([6, 0xf6, 0x65, 0x97, 0xd0, 0xd0])
        );
        assert_eq!(parse_mac("06:f6"), None);
    }
}
