use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use super::*;

struct Quiet;
impl Agent for Quiet {}

#[tokio::test]
async fn nothing_to_serve_is_an_error() {
    assert!(matches!(
        AgentServer::new(Quiet).bind().await,
        Err(ServerError::NoTransport)
    ));
}

#[tokio::test]
async fn the_socket_gets_its_mode_and_goes_away_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let bound = AgentServer::new(Quiet)
        .unix_socket(UnixOptions::new(&path).mode(0o600))
        .bind()
        .await
        .unwrap();
    assert_eq!(bound.unix_path(), Some(path.as_path()));
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    bound.serve_until(async {}).await;
    assert!(!path.exists(), "socket file left behind");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_but_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    // A socket file nobody listens on any more.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let bound = AgentServer::new(Quiet)
        .unix_socket(UnixOptions::new(&path))
        .bind()
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o660
    );

    // While it is bound, a second server must not take it over.
    let second = AgentServer::new(Quiet)
        .unix_socket(UnixOptions::new(&path))
        .bind()
        .await;
    assert!(
        matches!(&second, Err(ServerError::SocketInUse { .. })),
        "{:?}",
        second.err()
    );
    assert!(path.exists(), "the live socket was removed");
    drop(bound);
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    std::fs::write(&path, "precious").unwrap();
    let result = AgentServer::new(Quiet)
        .unix_socket(UnixOptions::new(&path))
        .bind()
        .await;
    assert!(matches!(result, Err(ServerError::NotASocket { .. })));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[tokio::test]
async fn tcp_listeners_report_their_ports() {
    let bound = AgentServer::new(Quiet)
        .grpc("127.0.0.1:0".parse().unwrap(), None)
        .http("127.0.0.1:0".parse().unwrap(), None)
        .bind()
        .await
        .unwrap();
    let (grpc, http) = (bound.grpc_addr().unwrap(), bound.http_addr().unwrap());
    assert_ne!(grpc.port(), 0);
    assert_ne!(http.port(), 0);
    assert_ne!(grpc, http);
    assert_eq!(bound.unix_path(), None);

    // A port already taken is an error naming the transport.
    let taken = AgentServer::new(Quiet).http(http, None).bind().await;
    assert!(
        matches!(
            taken,
            Err(ServerError::Bind {
                transport: "HTTP",
                ..
            })
        ),
        "{:?}",
        taken.err()
    );
}
