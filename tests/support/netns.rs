//! Throwaway network namespaces for end-to-end tests.
//!
//! [`NetNs::new`] creates a namespace and a veth pair: one end stays in the
//! root namespace (where the daemon attaches XDP and the test's servers
//! listen), the other lives inside the namespace (where the test's clients
//! run, through [`NetNs::run`]). Both ends get addresses from the
//! documentation ranges only, a /30 and a /64 of their own, so that tests
//! running in parallel, in one binary or several, never share a route.
//! Everything is removed on drop, also when the test panics.

use std::{
    fs::{self, File},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use ipnet::{Ipv4Net, Ipv6Net};

/// The IPv4 documentation ranges (RFC 5737), carved into /30s.
const V4_RANGES: [[u8; 3]; 3] = [[192, 0, 2], [198, 51, 100], [203, 0, 113]];
/// /30s available: 64 per /24.
const V4_SLOTS: u32 = 64 * V4_RANGES.len() as u32;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace joined to the root namespace by a veth pair.
#[derive(Debug)]
pub struct NetNs {
    /// Namespace name, as `ip netns` knows it.
    pub name: String,
    /// The veth end in the root namespace.
    pub host_if: String,
    /// The veth end inside the namespace.
    pub peer_if: String,
    /// The /30 both IPv4 addresses belong to.
    pub v4_net: Ipv4Net,
    pub host_v4: Ipv4Addr,
    pub peer_v4: Ipv4Addr,
    /// The /64 both IPv6 addresses belong to.
    pub v6_net: Ipv6Net,
    pub host_v6: Ipv6Addr,
    pub peer_v6: Ipv6Addr,
}

/// Runs `ip` with `args`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Addresses configured in the root namespace, both families.
fn root_addresses() -> Vec<IpAddr> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2): {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

fn link_exists(name: &str) -> bool {
    PathBuf::from("/sys/class/net").join(name).exists()
}

fn netns_path(name: &str) -> PathBuf {
    let run = PathBuf::from("/run/netns").join(name);
    if run.exists() {
        return run;
    }
    PathBuf::from("/var/run/netns").join(name)
}

/// Serialises address and name allocation across every test process of
/// this machine: the free-slot check and the creation must not interleave.
fn allocation_lock() -> File {
    let path = std::env::temp_dir().join("sentinel-tests-netns.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
    file
}

impl NetNs {
    /// Creates the namespace, the veth pair and the addresses, and waits
    /// until the root-side link is up. Panics (after cleaning up) on
    /// failure.
    pub fn new() -> Self {
        let pid = std::process::id();
        let lock = allocation_lock();
        let taken = root_addresses();
        let start = pid.wrapping_mul(7);
        for _ in 0..V4_SLOTS {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let slot = start.wrapping_add(n) % V4_SLOTS;
            let [a, b, c] = V4_RANGES[(slot / 64) as usize];
            let base = (slot % 64) as u8 * 4;
            let host_v4 = Ipv4Addr::new(a, b, c, base + 1);
            let peer_v4 = Ipv4Addr::new(a, b, c, base + 2);
            let v6_base = Ipv6Addr::new(0x2001, 0xdb8, 0x5e, slot as u16, 0, 0, 0, 0);
            let host_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0x5e, slot as u16, 0, 0, 0, 1);
            let peer_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0x5e, slot as u16, 0, 0, 0, 2);
            let name = format!("sentinel-t-{pid}-{n}");
            let host_if = format!("sv{}x{n}", pid % 10_000);
            let peer_if = format!("sc{}x{n}", pid % 10_000);
            if taken.iter().any(|t| {
                [IpAddr::V4(host_v4), IpAddr::V4(peer_v4)].contains(t)
                    || [IpAddr::V6(host_v6), IpAddr::V6(peer_v6)].contains(t)
            }) || link_exists(&host_if)
                || link_exists(&peer_if)
                || netns_path(&name).exists()
            {
                continue;
            }
            assert!(host_if.len() <= 15, "interface name {host_if} too long");
            let ns = NetNs {
                name,
                host_if,
                peer_if,
                v4_net: Ipv4Net::new(Ipv4Addr::new(a, b, c, base), 30).expect("/30 is valid"),
                host_v4,
                peer_v4,
                v6_net: Ipv6Net::new(v6_base, 64).expect("/64 is valid"),
                host_v6,
                peer_v6,
            };
            // From here on, `ns` cleans up whatever was created if a step
            // panics.
            ns.create();
            drop(lock);
            ns.wait_up();
            return ns;
        }
        panic!("no free /30 left in the IPv4 documentation ranges");
    }

    fn create(&self) {
        let (name, host, peer) = (&self.name, &self.host_if, &self.peer_if);
        ip(&["netns", "add", name]);
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", peer, "netns", name,
        ]);
        let host_v4 = format!("{}/30", self.host_v4);
        let peer_v4 = format!("{}/30", self.peer_v4);
        let host_v6 = format!("{}/64", self.host_v6);
        let peer_v6 = format!("{}/64", self.peer_v6);
        ip(&["addr", "add", &host_v4, "dev", host]);
        ip(&["-6", "addr", "add", &host_v6, "dev", host, "nodad"]);
        ip(&["link", "set", host, "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ip(&["-n", name, "addr", "add", &peer_v4, "dev", peer]);
        ip(&["-n", name, "-6", "addr", "add", &peer_v6, "dev", peer, "nodad"]);
        ip(&["-n", name, "link", "set", peer, "up"]);
    }

    /// Waits until the root-side end reports carrier (both ends up).
    fn wait_up(&self) {
        let operstate = PathBuf::from("/sys/class/net")
            .join(&self.host_if)
            .join("operstate");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = fs::read_to_string(&operstate).unwrap_or_default();
            if state.trim() == "up" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "veth {} is still '{}' after 10 s",
                self.host_if,
                state.trim()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `f` on a thread that has joined this namespace: sockets it
    /// creates belong to the namespace. A panic in `f` is re-raised here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = netns_path(&self.name);
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || {
                let file = File::open(&path)
                    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
                // SAFETY: `file` is an open namespace file; setns changes
                // the network namespace of this thread only, and the thread
                // ends with `f`.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns({}): {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
                drop(file);
                f()
            });
            match handle.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting either veth end deletes both; do it first, so that the
        // root-side link goes away even if the namespace outlives this
        // call (a socket still open in it keeps it alive).
        if link_exists(&self.host_if) {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_if])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
