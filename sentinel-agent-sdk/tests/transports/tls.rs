//! TLS and mutual TLS on gRPC and HTTP, with certificates made at run
//! time.

use std::{net::SocketAddr, sync::Arc};

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use sentinel_agent_sdk::{
    TlsOptions, protocol::grpc::pb::agent_processor_client::AgentProcessorClient,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tonic::transport::{Channel, Endpoint};

use crate::{
    grpc::call,
    http::{event, send},
    support::{Pki, Serve, headers_event, start, x_uri},
};

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("a valid name");
    // Under TLS 1.3 a refused client certificate shows only on the first
    // read after the handshake, so callers judge by the call, not by this.
    TlsConnector::from(config).connect(name, tcp).await
}

/// A tonic channel over our own TLS connector (tonic's TLS features would
/// pull in aws-lc-rs).
async fn grpc_client(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<AgentProcessorClient<Channel>, tonic::transport::Error> {
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        async move { tls_connect(addr, config).await.map(TokioIo::new) }
    });
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await?;
    Ok(AgentProcessorClient::new(channel))
}

/// Whether a gRPC call through `config` is answered.
async fn grpc_works(addr: SocketAddr, config: Arc<ClientConfig>) -> bool {
    let Ok(mut client) = grpc_client(addr, config).await else {
        return false;
    };
    match call(&mut client, &headers_event("/tls")).await {
        Ok(answer) => {
            assert_eq!(x_uri(&answer), Some("/tls"));
            true
        }
        Err(_) => false,
    }
}

/// Whether an HTTP call through `config` is answered.
async fn http_works(addr: SocketAddr, config: Arc<ClientConfig>) -> bool {
    let Ok(tls) = tls_connect(addr, config).await else {
        return false;
    };
    let request = event(&headers_event("/tls"));
    let exchange = async move {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .ok()?;
        tokio::spawn(conn);
        sender.send_request(request).await.ok()
    };
    match exchange.await {
        Some(response) => {
            assert_eq!(response.status(), http::StatusCode::OK);
            true
        }
        None => false,
    }
}

fn both(tls: TlsOptions) -> Serve {
    Serve {
        grpc: true,
        http: true,
        tls: Some(tls),
        ..Serve::default()
    }
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca() {
    let pki = Pki::new("sdk-tls");
    let cert = pki.server();
    let server = start(both(TlsOptions::new(&cert.cert_file, &cert.key_file))).await;
    let (grpc, http) = (server.grpc.unwrap(), server.http.unwrap());

    assert!(grpc_works(grpc, pki.client_config(&[b"h2"], None)).await);
    assert!(http_works(http, pki.client_config(&[b"http/1.1"], None)).await);
    // The full exchange, over TLS, through the same client as plain HTTP.
    let tls = tls_connect(http, pki.client_config(&[b"http/1.1"], None))
        .await
        .unwrap();
    let reply = send(tls, event(&headers_event("/over-tls"))).await;
    assert_eq!(x_uri(&reply.answer()), Some("/over-tls"));

    // A client trusting another CA gets nowhere.
    let stranger = Pki::new("stranger");
    assert!(!grpc_works(grpc, stranger.client_config(&[b"h2"], None)).await);
    assert!(!http_works(http, stranger.client_config(&[b"http/1.1"], None)).await);
    // Nor does plain text on a TLS port.
    let plain = AgentProcessorClient::connect(format!("http://{grpc}")).await;
    if let Ok(mut plain) = plain {
        assert!(call(&mut plain, &headers_event("/x")).await.is_err());
    }
    server.stop().await;
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new("sdk-mtls");
    let cert = pki.server();
    let proxy = pki.client("sentinel-proxy");
    let tls = TlsOptions::new(&cert.cert_file, &cert.key_file).require_client_certs(&pki.ca_file);
    let server = start(both(tls)).await;
    let (grpc, http) = (server.grpc.unwrap(), server.http.unwrap());

    assert!(grpc_works(grpc, pki.client_config(&[b"h2"], Some(&proxy))).await);
    assert!(http_works(http, pki.client_config(&[b"http/1.1"], Some(&proxy))).await);

    // Without a certificate: refused.
    assert!(!grpc_works(grpc, pki.client_config(&[b"h2"], None)).await);
    assert!(!http_works(http, pki.client_config(&[b"http/1.1"], None)).await);

    // With a certificate from another CA: refused.
    let other = Pki::new("other-ca");
    let impostor = other.client("impostor");
    assert!(!grpc_works(grpc, pki.client_config(&[b"h2"], Some(&impostor))).await);
    assert!(!http_works(http, pki.client_config(&[b"http/1.1"], Some(&impostor))).await);

    // A refused handshake does not disturb the listener.
    assert!(grpc_works(grpc, pki.client_config(&[b"h2"], Some(&proxy))).await);
    server.stop().await;
}

#[tokio::test]
async fn bad_tls_files_fail_at_bind_naming_the_file() {
    let pki = Pki::new("sdk-bad");
    let cert = pki.server();
    let missing = pki.ca_file.with_file_name("missing.pem");
    // The CA's certificate is not the server certificate's key.
    for (tls, what) in [
        (TlsOptions::new(&missing, &cert.key_file), "missing.pem"),
        (TlsOptions::new(&cert.cert_file, &missing), "missing.pem"),
        (
            TlsOptions::new(&cert.cert_file, &cert.key_file).require_client_certs(&missing),
            "missing.pem",
        ),
        (
            TlsOptions::new(&cert.cert_file, &cert.cert_file),
            "private key",
        ),
    ] {
        let result = sentinel_agent_sdk::AgentServer::new(crate::support::TestAgent::default())
            .grpc("127.0.0.1:0".parse().unwrap(), Some(tls))
            .bind()
            .await;
        let err = result.err().expect("bind succeeded with bad TLS files");
        assert!(err.to_string().contains(what), "{err}");
    }
}
