//! The reference agents (`sentinel-echo-agent`, `sentinel-denylist-agent`,
//! built on the SDK) beside the real daemon, as the README runs them.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use http::StatusCode;
use sentinel_tests::{
    daemon::{self as d, Daemon, DaemonConfig},
    http::{Upstream, get},
    netns::{Attempt, NetNs},
};

use super::*;

/// A reference agent process, killed on drop.
struct Process {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `binary` (built beside `sentinel`) on a Unix socket with
    /// `args`, and waits for the socket.
    fn start(binary: &str, args: &[&str]) -> Self {
        let bin = d::bin()
            .parent()
            .map(|dir| dir.join(binary))
            .unwrap_or_else(|| PathBuf::from(binary));
        assert!(
            bin.exists(),
            "{} is missing: `cargo xtask test` builds the whole workspace first",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("sentinel-ref-agent-")
            .tempdir()
            .unwrap_or_else(|e| panic!("{e}"));
        let socket = dir.path().join("agent.sock");
        let child = Command::new(&bin)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{binary} did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    fn transport(&self) -> String {
        format!("unix-socket \"{}\"", self.socket.display())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socket_of(p: &Process) -> &Path {
    &p.socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_agent_marks_every_request() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let echo = Process::start("sentinel-echo-agent", &[]);
    assert!(socket_of(&echo).exists());
    let d = daemon(
        &app,
        &["echo"],
        &[agent(
            "echo",
            "custom",
            &echo.transport(),
            "events \"request_headers\"",
        )],
        &[filter("echo", "echo", "")],
        "",
    );
    let r = get(d.listener("http"), "/").await;
    assert_eq!(r.status, StatusCode::OK, "{}", d.log());
    assert_eq!(app.last().header("x-agent-processed"), Some("true"));
}

fn status_from(ns: &NetNs, to: SocketAddr, path: &str) -> Option<u16> {
    let path = path.to_owned();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    })
}

/// The denylist agent blocks listed paths, and after two blocks within its
/// window pushes the client into the kernel: its next SYN is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_denylist_agent_pushes_repeat_offenders_into_the_kernel() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let ns = NetNs::new();
    let deny = Process::start(
        "sentinel-denylist-agent",
        &[
            "--block-path",
            "/admin",
            "--kernel-after",
            "2",
            "--kernel-ttl-seconds",
            "120",
        ],
    );
    let blocks = format!(
        "listeners {{\n    listener \"edge\" {{\n        address \"{}:0\"\n    }}\n}}\n\
         routes {{\n    route \"app\" {{\n        upstream \"app\"\n        filters \"deny\"\n    }}\n}}\n\
         upstreams {{\n    upstream \"app\" {{\n        targets {{\n            target {{ address \"{}\"; }}\n        }}\n    }}\n}}\n\
         agents {{\n{}}}\nfilters {{\n{}}}\n",
        ns.host_v4,
        app.target(),
        agent(
            "denylist",
            "waf",
            &deny.transport(),
            "events \"request_headers\"\n        kernel-push { max-ttl-seconds 600; }",
        ),
        filter("deny", "denylist", ""),
    );
    let daemon = Daemon::start(DaemonConfig::attached(&ns.host_if, "native").with_blocks(&blocks));
    let edge = daemon.listener("edge");
    assert_eq!(status_from(&ns, edge, "/"), Some(200), "{}", daemon.log());
    assert_eq!(status_from(&ns, edge, "/admin/users"), Some(403));
    assert!(
        daemon.deny_list().is_empty(),
        "one block is not yet a repeat offence"
    );
    assert_eq!(status_from(&ns, edge, "/admin"), Some(403));
    let entries = daemon.deny_list();
    let client = format!("{}/32", ns.peer_v4);
    let entry = entries
        .iter()
        .find(|e| e["prefix"] == client.as_str())
        .unwrap_or_else(|| panic!("{client} not denied: {entries:?}\n{}", daemon.log()));
    assert_eq!(entry["source"], "agent:denylist");
    assert_eq!(
        ns.tcp_exchange(edge, Duration::from_secs(2)),
        Attempt::TimedOut
    );
    assert_eq!(
        metric(
            &daemon,
            "sentinel_kernel_push_total",
            &[("agent", "denylist"), ("result", "applied")]
        ),
        1.0
    );
}
