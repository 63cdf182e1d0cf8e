//! gRPC and HTTP agents, plain, with TLS, with mutual TLS, and with
//! verification skipped (which logs the seed's warning).

use std::{collections::BTreeMap, sync::Arc};

use http::StatusCode;
use rustls::{ServerConfig, crypto::ring, server::WebPkiClientVerifier};
use sentinel_agent_protocol::{AgentResponse, Decision, Event, EventType, HeaderOp};
use sentinel_tests::{
    agent::{Handler, Listen, Reply, ScriptAgent, decide, on_events},
    http::{Upstream, get},
    tls::{Issued, Pki},
};

use super::*;

/// Blocks `/blocked`, tags everything else with a header.
fn gate() -> Handler {
    on_events(|r| match &r.event {
        Event::RequestHeaders(h) if h.uri == "/blocked" => decide(Decision::Block {
            status: 418,
            body: Some("teapot\n".into()),
            headers: BTreeMap::new(),
        }),
        Event::RequestHeaders(_) => Reply::Answer(AgentResponse {
            request_headers: vec![HeaderOp::Set {
                name: "x-remote-agent".into(),
                value: "seen".into(),
            }],
            ..AgentResponse::allow()
        }),
        _ => decide(Decision::Allow),
    })
}

fn server_tls(cert: &Issued, client_ca: Option<&Pki>) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"));
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                Arc::new(ring::default_provider()),
            )
            .build()
            .unwrap_or_else(|e| panic!("{e}")),
        ),
        None => builder.with_no_client_auth(),
    };
    Arc::new(
        builder
            .with_single_cert(vec![cert.cert.clone()], cert.key())
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

/// `grpc "URL" { tls }` or `http "URL" { tls }`.
fn remote(kind: &str, a: &ScriptAgent, tls: &str) -> String {
    if tls.is_empty() {
        format!("{kind} \"{}\"", a.address)
    } else {
        format!("{kind} \"{}\" {{\n            {tls}\n        }}", a.address)
    }
}

async fn check(d: &Daemon, app: &Upstream, what: &str, works: bool) {
    let addr = d.listener("http");
    let r = get(addr, "/ok").await;
    if works {
        assert_eq!(r.status, StatusCode::OK, "{what}: {}", d.log());
        assert_eq!(app.last().header("x-remote-agent"), Some("seen"), "{what}");
        let r = get(addr, "/blocked").await;
        assert_eq!(r.status.as_u16(), 418, "{what}");
        assert_eq!(r.text(), "teapot\n");
    } else {
        // failure-mode closed: the agent could not be reached.
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{what}: {}",
            d.log()
        );
    }
}

fn through(app: &Upstream, transport: &str) -> Daemon {
    daemon(
        app,
        &["f"],
        &[agent(
            "remote",
            "auth",
            transport,
            "events \"request_headers\"\n        failure-mode \"closed\"\n        timeout-ms 3000",
        )],
        &[filter("f", "remote", "")],
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_in_plain_text() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    for (kind, listen) in [("grpc", Listen::Grpc), ("http", Listen::Http)] {
        let a = ScriptAgent::start(listen, gate(), None).await;
        let d = through(&app, &remote(kind, &a, ""));
        check(&d, &app, kind, true).await;
        // The configure handshake came before the first event.
        let seen = a.seen();
        assert!(
            matches!(seen[0].event, Event::Configure(_)),
            "{kind}: {:?}",
            seen[0]
        );
        assert_eq!(a.events(EventType::RequestHeaders).len(), 2, "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mutual_tls_and_skipped_verification() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let pki = Pki::new("agents");
    let other = Pki::new("someone else");
    let server = pki.server("agent", &["localhost"]);
    let client = pki.client("sentinel", "sentinel-proxy");
    let ca = format!("ca-cert \"{}\"", pki.ca_file().display());
    let wrong_ca = format!("ca-cert \"{}\"", other.ca_file().display());
    let identity = format!(
        "client-cert \"{}\"\n            client-key \"{}\"",
        client.cert_file.display(),
        client.key_file.display()
    );
    for (kind, grpc) in [("grpc", true), ("http", false)] {
        let listen = || if grpc { Listen::Grpc } else { Listen::Http };

        // One-way TLS: verified against the CA.
        let a = ScriptAgent::start(listen(), gate(), Some(server_tls(&server, None))).await;
        check(
            &through(&app, &remote(kind, &a, &ca)),
            &app,
            &format!("{kind} tls"),
            true,
        )
        .await;
        // The wrong CA: the agent cannot be trusted, so it is not reached.
        check(
            &through(&app, &remote(kind, &a, &wrong_ca)),
            &app,
            &format!("{kind} tls, wrong CA"),
            false,
        )
        .await;
        // Skipping verification works, and says so.
        let d = through(&app, &remote(kind, &a, "insecure-skip-verify"));
        check(&d, &app, &format!("{kind} insecure-skip-verify"), true).await;
        assert!(
            d.log()
                .contains("TLS certificate verification disabled for agent connection"),
            "the seed's warning: {}",
            d.log()
        );

        // Mutual TLS: the agent requires our certificate.
        let m = ScriptAgent::start(listen(), gate(), Some(server_tls(&server, Some(&pki)))).await;
        check(
            &through(
                &app,
                &remote(kind, &m, &format!("{ca}\n            {identity}")),
            ),
            &app,
            &format!("{kind} mtls"),
            true,
        )
        .await;
        check(
            &through(&app, &remote(kind, &m, &ca)),
            &app,
            &format!("{kind} mtls without a client certificate"),
            false,
        )
        .await;
    }
}
