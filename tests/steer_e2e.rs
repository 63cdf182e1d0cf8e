//! Connection steering end to end: the real daemon runs inside a test
//! network namespace (so its sk_lookup program is attached there, never to
//! the machine's own namespace) and clients in the same namespace connect
//! over its loopback, from chosen 127/8 source addresses. Each test asserts
//! what a user sees: an HTTP answer or a refused connection, watchlist
//! entries and their hits, `sentinel_steering_total`.
//!
//! Needs root (BPF, network namespaces); without it every test says
//! `SKIPPED` and returns.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    os::fd::FromRawFd,
    time::{Duration, Instant},
};

use sentinel_tests::{
    self as support,
    daemon::{Daemon, DaemonConfig},
    netns::NetNs,
};

macro_rules! skip_unless_root {
    () => {
        if support::skip_unless_root("needs root (BPF, network namespaces)") {
            return;
        }
    };
}

/// Ports the steering rule names; nothing is bound on them.
const RANGE: (u16, u16) = (20000, 20049);

const BLOCKS: &str = r#"
system { worker-threads 1; }
listeners {
    listener "main" { address "127.0.0.1:0"; }
    listener "suspect" { address "127.0.0.1:0"; quarantine; }
}
routes { route "all" { static-response 200 "ok"; } }
"#;

/// The `kernel` block's steering lines.
fn steering(range: (u16, u16)) -> String {
    format!(
        "    steering {{\n        rule listener=\"main\" prefix=\"127.0.0.0/8\" ports=\"{}-{}\"\n    }}",
        range.0, range.1
    )
}

struct Setup {
    daemon: Daemon,
    ns: NetNs,
}

fn setup(range: (u16, u16)) -> Setup {
    let ns = NetNs::new();
    let daemon = Daemon::start(
        DaemonConfig::default()
            .with_blocks(BLOCKS)
            .with_kernel(&steering(range))
            .in_netns(ns.path()),
    );
    Setup { daemon, ns }
}

/// How one HTTP exchange from `from` to `to` ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The proxy answered with this status line.
    Answered(String),
    Refused,
    Other(String),
}

/// `GET /` from source address `from` (a 127/8 address of the namespace's
/// loopback) to `to`, run inside `ns`.
fn get(ns: &NetNs, from: Ipv4Addr, to: SocketAddr) -> Outcome {
    ns.run(move || {
        let mut stream = match connect_from(from, to) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Outcome::Refused;
            }
            Err(e) => return Outcome::Other(format!("connect: {e}")),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        if let Err(e) = stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        {
            return Outcome::Other(format!("write: {e}"));
        }
        let mut response = Vec::new();
        match stream.read_to_end(&mut response) {
            Ok(_) => {
                let text = String::from_utf8_lossy(&response);
                let line = text.lines().next().unwrap_or("").trim().to_owned();
                if line.is_empty() {
                    // Accepted, then closed by a socket that is not HTTP.
                    Outcome::Other(format!("no answer: {text:?}"))
                } else {
                    Outcome::Answered(line)
                }
            }
            Err(e) => Outcome::Other(format!("read: {e}")),
        }
    })
}

/// A TCP connection bound to `from` before connecting: std has no bind
/// before connect, so the socket is made with libc.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned by the returned
    // stream (or closed on error); the address structs live on the stack
    // for the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let local = sockaddr(SocketAddrV4::new(from, 0));
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(to);
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn ok() -> Outcome {
    Outcome::Answered("HTTP/1.1 200 OK".into())
}

fn steered(s: &Setup, listener: &str, reason: &str) -> f64 {
    s.ns.run(|| {
        s.daemon
            .metric_value(
                "sentinel_steering_total",
                &[("listener", listener), ("reason", reason)],
            )
            .unwrap_or(0.0)
    })
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const SUSPECT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn at(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn many_ports_and_addresses_reach_the_one_listener() {
    skip_unless_root!();
    let s = setup(RANGE);
    let ports = [RANGE.0, RANGE.0 + 1, 20017, 20033, RANGE.1];
    for port in ports {
        assert_eq!(
            get(&s.ns, CLIENT, at([127, 0, 0, 1], port)),
            ok(),
            "port {port}"
        );
    }
    // Any address of the prefix, none of them bound.
    assert_eq!(get(&s.ns, CLIENT, at([127, 9, 8, 7], 20005)), ok());
    assert_eq!(steered(&s, "main", "rule"), (ports.len() + 1) as f64);
    // Outside the range: the kernel's own lookup, which finds nothing.
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], RANGE.1 + 1)),
        Outcome::Refused
    );
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], RANGE.0 - 1)),
        Outcome::Refused
    );
}

#[test]
fn watchlisted_sources_land_on_the_quarantine_listener() {
    skip_unless_root!();
    let s = setup(RANGE);
    s.daemon
        .cli_ok(&["watch", "add", "127.0.0.2", "--reason", "probing"]);
    let main = s.daemon.listener("main");
    for to in [at([127, 0, 0, 1], 20001), main] {
        assert_eq!(get(&s.ns, SUSPECT, to), ok(), "suspect to {to}");
        assert_eq!(get(&s.ns, CLIENT, to), ok(), "client to {to}");
    }
    assert_eq!(steered(&s, "suspect", "watchlist"), 2.0);
    // The client's two connections: one steered by the rule, one by the
    // main listener's own address (added because quarantine is on).
    assert_eq!(steered(&s, "main", "rule"), 2.0);
    let listed = s.daemon.cli_json(&["watch", "list", "--json"]);
    let entries = listed.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(entries[0]["prefix"], "127.0.0.2/32");
    assert_eq!(entries[0]["reason"], "probing");
    assert_eq!(entries[0]["source"], "admin");
    assert_eq!(entries[0]["hits"], 2);

    // Removed: the suspect is an ordinary client again.
    s.daemon.cli_ok(&["watch", "remove", "127.0.0.2"]);
    assert_eq!(get(&s.ns, SUSPECT, at([127, 0, 0, 1], 20001)), ok());
    assert_eq!(steered(&s, "suspect", "watchlist"), 2.0);
    assert_eq!(steered(&s, "main", "rule"), 3.0);
    // Bad input is refused with the same words as the denylist's.
    let out = s.daemon.cli(&["watch", "add", "127.0.0.1/8"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host bits set"),
        "{out:?}"
    );
}

#[test]
fn an_expired_watch_entry_stops_steering() {
    skip_unless_root!();
    let s = setup(RANGE);
    s.daemon
        .cli_ok(&["watch", "add", "127.0.0.2", "--ttl", "1s"]);
    let to = at([127, 0, 0, 1], 20002);
    assert_eq!(get(&s.ns, SUSPECT, to), ok());
    assert_eq!(steered(&s, "suspect", "watchlist"), 1.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(&s.ns, SUSPECT, to), ok());
    assert_eq!(
        steered(&s, "suspect", "watchlist"),
        1.0,
        "an expired entry must not steer"
    );
    assert_eq!(steered(&s, "main", "rule"), 1.0);
}

#[test]
fn a_reload_adds_and_removes_ports_without_rebinding() {
    skip_unless_root!();
    let s = setup((20000, 20001));
    let main = s.daemon.listener("main");
    assert_eq!(get(&s.ns, CLIENT, at([127, 0, 0, 1], 20001)), ok());
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], 20100)),
        Outcome::Refused
    );
    let text = std::fs::read_to_string(&s.daemon.config_path).unwrap();
    let text = text.replace("ports=\"20000-20001\"", "ports=\"20100-20101\"");
    std::fs::write(&s.daemon.config_path, text).unwrap();
    s.daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&s.ns, CLIENT, at([127, 0, 0, 1], 20100)) != ok() {
        assert!(
            Instant::now() < deadline,
            "the reload did not steer port 20100; log:\n{}",
            s.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&s.ns, CLIENT, at([127, 0, 0, 1], 20101)), ok());
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], 20001)),
        Outcome::Refused
    );
    assert_eq!(s.daemon.listener("main"), main, "the listener was rebound");
}

#[test]
fn stopping_the_daemon_leaves_other_sockets_as_they_were() {
    skip_unless_root!();
    let mut s = setup(RANGE);
    // Two servers of someone else in the namespace: one on a port no rule
    // names, one inside the steered range (bound, but steered past).
    let (outside, inside) = s.ns.run(|| {
        (
            TcpListener::bind("127.0.0.1:20060").unwrap(),
            TcpListener::bind("127.0.0.1:20010").unwrap(),
        )
    });
    let accepts = |l: &TcpListener| {
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match l.accept() {
                Ok(_) => return true,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return false,
            }
        }
    };
    let connect = |s: &Setup, port| {
        s.ns.run(move || connect_from(CLIENT, at([127, 0, 0, 1], port)).is_ok())
    };
    assert!(connect(&s, 20060));
    assert!(
        accepts(&outside),
        "an unsteered port reaches its own socket"
    );
    assert_eq!(get(&s.ns, CLIENT, at([127, 0, 0, 1], 20010)), ok());
    assert!(!accepts(&inside), "a steered port goes to the listener");

    assert!(s.daemon.stop().success(), "log:\n{}", s.daemon.log());
    assert!(connect(&s, 20060));
    assert!(accepts(&outside));
    assert!(connect(&s, 20010));
    assert!(accepts(&inside), "after stop, steering is gone");
    assert_eq!(
        get(&s.ns, CLIENT, at([127, 0, 0, 1], 20011)),
        Outcome::Refused
    );
}
