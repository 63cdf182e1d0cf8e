//! Throwaway network namespaces for end-to-end tests.
//!
//! [`NetNs::new`] creates a namespace and a veth pair: one end stays in the
//! root namespace (where the daemon attaches XDP and the test's servers
//! listen), the other lives inside the namespace (where the test's clients
//! run, through [`NetNs::run`]). Both ends get addresses from the
//! documentation ranges only, a /30 and a /64 of their own, so that tests
//! running in parallel, in one binary or several, never share a route.
//! Everything is removed on drop, also when the test panics.
//!
//! Traffic helpers live here too: a TCP exchange and UDP datagrams sent
//! from inside the namespace, and an echo server for the root side.

use std::{
    fs::{self, File},
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

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

/// Networks the root namespace already reaches: its addresses with their
/// prefix length, and the destinations of its routes (default routes
/// aside). A test network must overlap none of them, or it could capture
/// traffic meant for the host's own links (this machine's uplink may use a
/// documentation range itself).
fn root_networks() -> Vec<IpNet> {
    let run = |args: &[&str]| {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2): {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut nets = Vec::new();
    for line in run(&["-o", "addr", "show"]).lines() {
        let mut words = line.split_whitespace();
        if words.any(|w| w == "inet" || w == "inet6")
            && let Some(net) = words.next().and_then(|w| w.parse::<IpNet>().ok())
        {
            nets.push(net);
        }
    }
    for args in [&["-4", "route", "show"], &["-6", "route", "show"]] {
        for line in run(args).lines() {
            let Some(dest) = line.split_whitespace().next() else {
                continue;
            };
            let net = dest
                .parse::<IpNet>()
                .ok()
                .or_else(|| dest.parse::<IpAddr>().ok().map(IpNet::from));
            nets.extend(net);
        }
    }
    nets.retain(|n| n.prefix_len() > 0);
    nets
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
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
    crate::machine_lock("sentinel-tests-netns.lock")
}

impl NetNs {
    /// Creates the namespace, the veth pair and the addresses, and waits
    /// until the root-side link is up. Panics (after cleaning up) on
    /// failure.
    pub fn new() -> Self {
        let pid = std::process::id();
        let lock = allocation_lock();
        let taken = root_networks();
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
            let v4_net = Ipv4Net::new(Ipv4Addr::new(a, b, c, base), 30).expect("/30 is valid");
            let v6_net = Ipv6Net::new(v6_base, 64).expect("/64 is valid");
            if taken
                .iter()
                .any(|t| overlaps(t, &IpNet::V4(v4_net)) || overlaps(t, &IpNet::V6(v6_net)))
                || link_exists(&host_if)
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
                v4_net,
                host_v4,
                peer_v4,
                v6_net,
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
        ip(&[
            "-n", name, "-6", "addr", "add", &peer_v6, "dev", peer, "nodad",
        ]);
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

    /// Runs `ip -n <namespace> <args>`, panicking with its stderr when it
    /// fails: addresses and routes a test adds inside its own namespace,
    /// gone with it.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// The namespace's file (`/run/netns/<name>`), for `setns`.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
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

    /// One TCP connection from inside the namespace to `to`: connects
    /// (waiting at most `connect_timeout`), sends a few bytes and reads them
    /// back, as an [`EchoServer`] answers.
    pub fn tcp_exchange(&self, to: SocketAddr, connect_timeout: Duration) -> Attempt {
        self.run(move || {
            let mut stream = match TcpStream::connect_timeout(&to, connect_timeout) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::TimedOut => return Attempt::TimedOut,
                Err(e) => return Attempt::Failed(format!("connect: {e}")),
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let message = b"sentinel end-to-end";
            if let Err(e) = stream.write_all(message) {
                return Attempt::Failed(format!("write: {e}"));
            }
            let mut back = [0u8; 19];
            match stream.read_exact(&mut back) {
                Ok(()) if &back == message => Attempt::Exchanged,
                Ok(()) => Attempt::Failed(format!("echo mismatch: {back:?}")),
                Err(e) => Attempt::Failed(format!("read: {e}")),
            }
        })
    }

    /// Sends `count` UDP datagrams of `payload` bytes from inside the
    /// namespace, from its veth address of `to`'s family, to `to`.
    pub fn send_udp(&self, to: SocketAddr, count: usize, payload: usize) {
        let from: IpAddr = match to {
            SocketAddr::V4(_) => self.peer_v4.into(),
            SocketAddr::V6(_) => self.peer_v6.into(),
        };
        self.run(move || {
            let socket = UdpSocket::bind((from, 0)).expect("bind the UDP client");
            let data = vec![0x5a; payload];
            for _ in 0..count {
                socket.send_to(&data, to).expect("send a datagram");
            }
        });
    }
}

/// How a [`NetNs::tcp_exchange`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Connected and got the bytes back.
    Exchanged,
    /// No answer to the SYN before the timeout: what a silent drop looks
    /// like.
    TimedOut,
    /// Anything else (refused, reset, wrong bytes...).
    Failed(String),
}

/// A TCP echo server (one read, echoed back, per connection) on an address
/// of the root namespace; stops on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `ip`, port chosen by the kernel.
    pub fn start(ip: impl Into<IpAddr>) -> Self {
        let listener = TcpListener::bind((ip.into(), 0)).expect("bind the echo server");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let addr = listener.local_addr().expect("echo server address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || echo(stream));
                    }
                    // WouldBlock, or a transient accept error: poll again.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 256];
    if let Ok(n) = stream.read(&mut buf) {
        let _ = stream.write_all(&buf[..n]);
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Datagrams `socket` receives until none arrives for 500 ms.
pub fn udp_received(socket: &UdpSocket) -> usize {
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("set a read timeout");
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while socket.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
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
