//! A test agent, a server running it, small clients for each transport
//! written from the protocol crate's types, and a throwaway CA.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    ClientConfig, RootCertStore,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use sentinel_agent_sdk::{
    Agent, AgentRequest, AgentResponse, AgentServer, BodyChunkEvent, ConfigureError,
    ConfigureEvent, Event, GuardrailDetection, GuardrailInspectEvent, GuardrailResult,
    RequestHeadersEvent, RequestMetadata, Verdict, async_trait,
    protocol::{MAX_MESSAGE_SIZE, frame},
};
use tokio::{net::UnixStream, sync::oneshot, task::JoinHandle};

/// Answers by the request's URI:
/// - `/sleep/N`: after N milliseconds;
/// - `/panic`: panics;
/// - `/invalid`: a block with status 42, which does not build;
/// - `/block`: 403 with a body;
/// - anything else: at once.
///
/// Every answer but the failing ones sets `x-uri` to the URI, so a test
/// can tell whose answer it got. `config.refuse` (a string) refuses the
/// configuration with that reason.
#[derive(Default)]
pub struct TestAgent {
    pub configures: AtomicUsize,
    running: AtomicUsize,
    pub most_at_once: AtomicUsize,
}

#[async_trait]
impl Agent for TestAgent {
    fn name(&self) -> &str {
        "test"
    }

    async fn on_configure(&self, event: &ConfigureEvent) -> Result<(), ConfigureError> {
        self.configures.fetch_add(1, Ordering::SeqCst);
        match event.config.get("refuse").and_then(|r| r.as_str()) {
            Some(reason) => Err(ConfigureError::new(reason)),
            None => Ok(()),
        }
    }

    async fn on_request_headers(&self, event: &RequestHeadersEvent) -> Verdict {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        let uri = event.uri.as_str();
        if let Some(ms) = uri.strip_prefix("/sleep/") {
            let ms: u64 = ms.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        match uri {
            "/panic" => panic!("the test agent panics on /panic"),
            "/invalid" => Verdict::block(42),
            "/block" => Verdict::block(403)
                .with_body("no")
                .set_request_header("x-uri", uri),
            _ => Verdict::allow().set_request_header("x-uri", uri),
        }
    }

    async fn on_request_body_chunk(&self, event: &BodyChunkEvent) -> Verdict {
        Verdict::allow().replace_body(event.data.to_ascii_uppercase())
    }

    async fn on_guardrail_inspect(&self, event: &GuardrailInspectEvent) -> Verdict {
        let detected = event.content.contains("ignore previous");
        Verdict::allow().guardrail(GuardrailResult {
            detected,
            confidence: if detected { 0.9 } else { 0.0 },
            detections: if detected {
                vec![GuardrailDetection {
                    category: "prompt_injection".into(),
                    description: "override".into(),
                    start: None,
                    end: None,
                }]
            } else {
                vec![]
            },
        })
    }
}

/// The `x-uri` an answer set, if any.
pub fn x_uri(response: &AgentResponse) -> Option<&str> {
    response.request_headers.iter().find_map(|op| match op {
        sentinel_agent_sdk::HeaderOp::Set { name, value } if name == "x-uri" => {
            Some(value.as_str())
        }
        _ => None,
    })
}

pub fn headers_event(uri: &str) -> AgentRequest {
    AgentRequest::new(Event::RequestHeaders(RequestHeadersEvent {
        metadata: RequestMetadata {
            correlation_id: format!("c-{uri}"),
            request_id: "r".into(),
            client_ip: "203.0.113.7".into(),
            ..RequestMetadata::default()
        },
        method: "GET".into(),
        uri: uri.into(),
        headers: Default::default(),
    }))
}

pub fn configure_event(offered: &[&str], config: serde_json::Value) -> AgentRequest {
    AgentRequest::new(Event::Configure(ConfigureEvent {
        agent_id: "test".into(),
        config,
        extensions: offered.iter().map(|s| s.to_string()).collect(),
        kernel_push: None,
    }))
}

/// A server serving in the background until stopped.
pub struct Running {
    pub agent: Arc<TestAgent>,
    pub unix: Option<PathBuf>,
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Options for [`start`].
#[derive(Default)]
pub struct Serve {
    pub unix: bool,
    pub grpc: bool,
    pub http: bool,
    pub tls: Option<sentinel_agent_sdk::TlsOptions>,
    /// Default: 5 s.
    pub drain_timeout: Option<Duration>,
}

pub async fn start(what: Serve) -> Running {
    let agent = Arc::new(TestAgent::default());
    let dir = tempfile::Builder::new()
        .prefix("sentinel-sdk-test-")
        .tempdir()
        .unwrap();
    let mut server = AgentServer::new(agent.clone())
        .drain_timeout(what.drain_timeout.unwrap_or(Duration::from_secs(5)));
    if what.unix {
        server = server.unix_socket(sentinel_agent_sdk::UnixOptions::new(
            dir.path().join("agent.sock"),
        ));
    }
    let any = "127.0.0.1:0".parse().unwrap();
    if what.grpc {
        server = server.grpc(any, what.tls.clone());
    }
    if what.http {
        server = server.http(any, what.tls.clone());
    }
    let bound = server.bind().await.unwrap();
    let (unix, grpc, http) = (
        bound.unix_path().map(Path::to_owned),
        bound.grpc_addr(),
        bound.http_addr(),
    );
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(bound.serve_until(async move {
        let _ = stopped.await;
    }));
    Running {
        agent,
        unix,
        grpc,
        http,
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
    }
}

impl Running {
    /// Signals shutdown and waits for the server to finish draining.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the server did not stop within 10 s")
                .expect("the server task failed");
        }
    }

    pub async fn unix_client(&self) -> UnixClient {
        UnixClient::connect(self.unix.as_deref().expect("no unix socket served")).await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The proxy's side of a Unix-socket connection.
pub struct UnixClient {
    pub stream: UnixStream,
}

impl UnixClient {
    pub async fn connect(path: &Path) -> Self {
        Self {
            stream: UnixStream::connect(path).await.unwrap(),
        }
    }

    pub async fn send(&mut self, request: &AgentRequest) {
        frame::write_frame(&mut self.stream, &request.to_json())
            .await
            .unwrap();
    }

    pub async fn send_with_id(&mut self, mut request: AgentRequest, id: u64) {
        request.id = Some(id);
        self.send(&request).await;
    }

    /// The next answer; `None` once the agent has closed the connection.
    pub async fn recv(&mut self) -> Option<AgentResponse> {
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            frame::read_frame(&mut self.stream, MAX_MESSAGE_SIZE),
        )
        .await
        .expect("no answer within 10 s");
        match read {
            Ok(Some(bytes)) => Some(AgentResponse::from_json(&bytes).unwrap()),
            Ok(None) => None,
            // A reset is the agent closing too.
            Err(frame::FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                None
            }
            Err(e) => panic!("reading an answer: {e}"),
        }
    }

    pub async fn call(&mut self, request: &AgentRequest) -> AgentResponse {
        self.send(request).await;
        self.recv().await.expect("the agent closed the connection")
    }

    /// Asserts the agent closes the connection without another answer.
    pub async fn expect_closed(&mut self) {
        if let Some(answer) = self.recv().await {
            panic!("expected the connection to close, got {answer:?}");
        }
    }
}

/// A CA and the certificates it signs, as PEM files in a temporary
/// directory.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_file: PathBuf,
    dir: tempfile::TempDir,
}

pub struct Issued {
    pub cert: CertificateDer<'static>,
    key: Vec<u8>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Issued {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sentinel-sdk-pki-")
            .tempdir()
            .unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Self { ca, ca_file, dir }
    }

    fn issue(&self, stem: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_file = self.dir.path().join(format!("{stem}.pem"));
        let key_file = self.dir.path().join(format!("{stem}-key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Issued {
            cert: cert.der().clone(),
            key: key.serialize_der(),
            cert_file,
            key_file,
        }
    }

    /// A certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        self.issue(
            "server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    pub fn client(&self, name: &str) -> Issued {
        self.issue(name, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client trusting this CA, offering `alpn`, with `identity` if given.
    pub fn client_config(&self, alpn: &[&[u8]], identity: Option<&Issued>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(vec![id.cert.clone()], id.key())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}
