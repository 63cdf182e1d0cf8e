//! The built binaries, end to end over a Unix socket, as the proxy would
//! talk to them.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use sentinel_agent_sdk::{
    AgentRequest, AgentResponse, ConfigureEvent, Decision, Event, HeaderOp, KernelAction,
    KernelPushLimits, RequestHeadersEvent, RequestMetadata, extensions,
    protocol::{MAX_MESSAGE_SIZE, frame},
};
use serde_json::json;
use tokio::net::UnixStream;

/// A running agent binary, killed if the test ends without stopping it.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn spawn(binary: &str, args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sentinel-agents-e2e-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(binary)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    /// Connects once the socket accepts, within 20 s.
    async fn connect(&mut self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket).await {
                return Client { stream };
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the agent exited before listening: {status}");
            }
            assert!(Instant::now() < deadline, "the agent never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit status, within 10 s.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    stream: UnixStream,
}

impl Client {
    async fn send(&mut self, request: &AgentRequest) {
        frame::write_frame(&mut self.stream, &request.to_json())
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> Option<AgentResponse> {
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            frame::read_frame(&mut self.stream, MAX_MESSAGE_SIZE),
        )
        .await
        .expect("no answer within 10 s")
        .unwrap();
        read.map(|bytes| AgentResponse::from_json(&bytes).unwrap())
    }

    async fn call(&mut self, request: &AgentRequest) -> AgentResponse {
        self.send(request).await;
        self.recv().await.expect("the agent closed the connection")
    }
}

fn headers(ip: &str, uri: &str) -> AgentRequest {
    AgentRequest::new(Event::RequestHeaders(RequestHeadersEvent {
        metadata: RequestMetadata {
            correlation_id: format!("{ip} {uri}"),
            request_id: "r".into(),
            client_ip: ip.into(),
            ..RequestMetadata::default()
        },
        method: "GET".into(),
        uri: uri.into(),
        headers: Default::default(),
    }))
}

fn with_id(mut request: AgentRequest, id: u64) -> AgentRequest {
    request.id = Some(id);
    request
}

#[tokio::test]
async fn echo_agent_marks_requests_and_stops_on_sigterm() {
    let mut agent = Agent::spawn(env!("CARGO_BIN_EXE_sentinel-echo-agent"), &[]);
    let mut client = agent.connect().await;
    let answer = client.call(&headers("192.0.2.1", "/anything")).await;
    assert_eq!(answer.decision, Decision::Allow);
    assert_eq!(
        answer.request_headers,
        [HeaderOp::Set {
            name: "X-Agent-Processed".into(),
            value: "true".into()
        }]
    );
    drop(client);

    let status = agent.terminate();
    assert!(status.success(), "{status}");
    assert!(!agent.socket().exists(), "socket file left behind");
}

#[tokio::test]
async fn denylist_agent_blocks_and_pushes_repeat_offenders() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deny.txt");
    std::fs::write(&file, "# from a file\n/wp-login.php\n198.51.100.0/24\n").unwrap();
    let mut agent = Agent::spawn(
        env!("CARGO_BIN_EXE_sentinel-denylist-agent"),
        &[
            "--block-path",
            "/admin",
            "--block-ip",
            "192.0.2.66",
            "--block-file",
            file.to_str().unwrap(),
            "--kernel-after",
            "2",
            "--kernel-ttl-seconds",
            "600",
        ],
    );
    let mut client = agent.connect().await;

    // The proxy's handshake: multiplexing and kernel pushes (capped at
    // 120 s) offered, and the agent's config block.
    let answer = client
        .call(&AgentRequest::new(Event::Configure(ConfigureEvent {
            agent_id: "denylist".into(),
            config: json!({"paths": ["/secret"], "ips": "2001:db8::/32"}),
            extensions: vec![extensions::MULTIPLEX.into(), extensions::KERNEL_PUSH.into()],
            kernel_push: Some(KernelPushLimits {
                max_ttl_seconds: 120,
                min_prefix_len_v4: 24,
                min_prefix_len_v6: 64,
            }),
        })))
        .await;
    assert_eq!(answer.decision, Decision::Allow);
    assert_eq!(
        answer.extensions,
        [extensions::MULTIPLEX, extensions::KERNEL_PUSH]
    );

    let cases = [
        ("203.0.113.5", "/public", None),
        ("203.0.113.5", "/admin/panel", Some("denylist:path:/admin")),
        (
            "203.0.113.6",
            "/wp-login.php",
            Some("denylist:path:/wp-login.php"),
        ),
        ("203.0.113.7", "/secret/x", Some("denylist:path:/secret")),
        ("192.0.2.66", "/", Some("denylist:ip:192.0.2.66/32")),
        ("198.51.100.9", "/", Some("denylist:ip:198.51.100.0/24")),
        ("2001:db8::9", "/", Some("denylist:ip:2001:db8::/32")),
    ];
    for (id, (ip, uri, _)) in cases.iter().enumerate() {
        client.send(&with_id(headers(ip, uri), id as u64)).await;
    }
    for _ in 0..cases.len() {
        let answer = client.recv().await.unwrap();
        let (ip, uri, rule) = cases[answer.id.unwrap() as usize];
        match rule {
            None => assert_eq!(answer.decision, Decision::Allow, "{ip} {uri}"),
            Some(rule) => {
                let Decision::Block { status, body, .. } = &answer.decision else {
                    panic!("{ip} {uri} not blocked: {answer:?}");
                };
                assert_eq!(*status, 403);
                assert_eq!(body.as_deref(), Some("Forbidden\n"));
                assert_eq!(answer.audit.as_ref().unwrap().rule_ids, [rule]);
                assert!(
                    answer.kernel_push.is_none(),
                    "{ip} {uri} pushed on its first block"
                );
            }
        }
    }

    // The second block of 203.0.113.5 within the window asks for a deny,
    // capped at the offered 120 s.
    let answer = client
        .call(&with_id(headers("203.0.113.5", "/admin"), 100))
        .await;
    assert_eq!(answer.id, Some(100));
    let push = answer
        .kernel_push
        .expect("no kernel push for a repeat offender");
    assert_eq!(push.action, KernelAction::Deny);
    assert_eq!(push.prefix.as_deref(), Some("203.0.113.5/32"));
    assert_eq!(push.ttl_seconds, Some(120));

    // A config block with an unknown key is refused, and that connection
    // closed.
    let mut other = agent.connect().await;
    let refused = other
        .call(&AgentRequest::new(Event::Configure(ConfigureEvent {
            agent_id: "denylist".into(),
            config: json!({"ip": ["192.0.2.0/24"]}),
            extensions: vec![],
            kernel_push: None,
        })))
        .await;
    let Decision::Block { status, body, .. } = &refused.decision else {
        panic!("configuration not refused: {refused:?}");
    };
    assert_eq!(*status, 500);
    assert!(body.as_deref().unwrap().contains("unknown key \"ip\""));
    assert!(other.recv().await.is_none());

    // The first connection is still served.
    let answer = client
        .call(&with_id(headers("203.0.113.9", "/fine"), 101))
        .await;
    assert_eq!(answer.decision, Decision::Allow);
    drop(client);

    let status = agent.terminate();
    assert!(status.success(), "{status}");
}

#[test]
fn denylist_agent_refuses_bad_rules_at_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_sentinel-denylist-agent"))
        .args(["--socket", "/nonexistent/a.sock", "--block-ip", "not-an-ip"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not-an-ip"), "{stderr}");
}

#[test]
fn an_agent_needs_a_transport() {
    let output = Command::new(env!("CARGO_BIN_EXE_sentinel-echo-agent"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--socket"), "{stderr}");
}
