//! The HTTP transport, through a hyper client (and a raw socket where the
//! client must misbehave).

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sentinel_agent_sdk::{
    AgentRequest, AgentResponse, Decision, extensions,
    protocol::{MAX_MESSAGE_SIZE, VERSION_HEADER},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{Serve, configure_event, headers_event, start, x_uri};

fn http() -> Serve {
    Serve {
        http: true,
        ..Serve::default()
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Reply {
    pub fn answer(&self) -> AgentResponse {
        assert_eq!(self.status, StatusCode::OK, "{:?}", self.body);
        assert_eq!(self.content_type.as_deref(), Some("application/json"));
        AgentResponse::from_json(&self.body).unwrap()
    }

    /// The `error` of a JSON error body.
    pub fn error(&self) -> String {
        assert_eq!(self.content_type.as_deref(), Some("application/json"));
        let value: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        value["error"].as_str().unwrap().to_owned()
    }
}

/// Sends one request over HTTP/1.1 on `io`.
pub async fn send<I>(io: I, request: Request<Full<Bytes>>) -> Reply
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        content_type,
        body,
    }
}

pub fn post(path: &str, version: Option<&str>, body: Vec<u8>) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path)
        .header(header::HOST, "agent.test")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(v) = version {
        builder = builder.header(VERSION_HEADER, v);
    }
    builder.body(Full::new(Bytes::from(body))).unwrap()
}

pub fn event(request: &AgentRequest) -> Request<Full<Bytes>> {
    post("/agent", Some("1"), request.to_json())
}

async fn call(addr: SocketAddr, request: Request<Full<Bytes>>) -> Reply {
    send(TcpStream::connect(addr).await.unwrap(), request).await
}

#[tokio::test]
async fn events_round_trip_on_any_path() {
    let server = start(http()).await;
    let addr = server.http.unwrap();

    let answer = call(
        addr,
        event(&configure_event(&[extensions::MULTIPLEX], json!({}))),
    )
    .await
    .answer();
    assert_eq!(answer.decision, Decision::Allow);
    assert!(answer.extensions.is_empty());

    for path in ["/agent", "/", "/some/other/path?x=1"] {
        let reply = call(addr, post(path, Some("1"), headers_event(path).to_json())).await;
        assert_eq!(x_uri(&reply.answer()), Some(path));
    }

    let answer = call(addr, event(&headers_event("/block"))).await.answer();
    assert_eq!(answer.decision.name(), "block");
    server.stop().await;
}

#[tokio::test]
async fn the_seeds_example_request_is_answered() {
    let server = start(http()).await;
    let seed = br#"{
      "version": 1,
      "event_type": "request_headers",
      "payload": {
        "metadata": {
          "correlation_id": "abc123",
          "request_id": "req-456",
          "client_ip": "192.168.1.100",
          "route_id": "api-route"
        },
        "method": "POST",
        "uri": "/api/users",
        "headers": {
          "content-type": ["application/json"],
          "authorization": ["Bearer token..."]
        }
      }
    }"#;
    let reply = call(
        server.http.unwrap(),
        post("/agent", Some("1"), seed.to_vec()),
    )
    .await;
    assert_eq!(x_uri(&reply.answer()), Some("/api/users"));
    server.stop().await;
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let server = start(http()).await;
    let io = TcpStream::connect(server.http.unwrap()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::post("http://agent.test/agent")
        .header(VERSION_HEADER, "1")
        .body(Full::new(Bytes::from(headers_event("/h2").to_json())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        x_uri(&AgentResponse::from_json(&body).unwrap()),
        Some("/h2")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_missing_or_wrong_version_header_is_400() {
    let server = start(http()).await;
    let addr = server.http.unwrap();
    let body = headers_event("/x").to_json();
    for (version, why) in [
        (None, "no header"),
        (Some("2"), "\"2\""),
        (Some("one"), "\"one\""),
        (Some(""), "\"\""),
    ] {
        let reply = call(addr, post("/agent", version, body.clone())).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        let error = reply.error();
        assert!(error.contains(VERSION_HEADER), "{error}");
        assert!(error.contains(why), "{error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_json_and_bad_envelopes_are_400() {
    let server = start(http()).await;
    let addr = server.http.unwrap();
    let mut v2 = headers_event("/x");
    v2.version = 2;
    for (body, why) in [
        (b"not json".to_vec(), "invalid JSON"),
        (Vec::new(), "invalid JSON"),
        (
            br#"{"version":1,"event_type":"nope","payload":{}}"#.to_vec(),
            "nope",
        ),
        (v2.to_json(), "version 2"),
    ] {
        let reply = call(addr, post("/agent", Some("1"), body)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        let error = reply.error();
        assert!(error.contains(why), "{error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn only_post_is_accepted() {
    let server = start(http()).await;
    let request = Request::get("/agent")
        .header(header::HOST, "agent.test")
        .header(VERSION_HEADER, "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = call(server.http.unwrap(), request).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(reply.error().contains("POST"));
    server.stop().await;
}

#[tokio::test]
async fn a_failing_hook_is_500() {
    let server = start(http()).await;
    let addr = server.http.unwrap();
    for (uri, why) in [("/panic", "panicked"), ("/invalid", "200-599")] {
        let reply = call(addr, event(&headers_event(uri))).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(reply.error().contains(why), "{}", reply.error());
    }
    assert_eq!(
        x_uri(&call(addr, event(&headers_event("/ok"))).await.answer()),
        Some("/ok")
    );
    server.stop().await;
}

/// Reads a raw HTTP/1.1 response to its end and returns its status.
async fn raw_status(stream: &mut TcpStream) -> (u16, String) {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, text)
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_413_before_it_is_sent() {
    let server = start(http()).await;
    let mut stream = TcpStream::connect(server.http.unwrap()).await.unwrap();
    let head = format!(
        "POST /agent HTTP/1.1\r\nHost: agent.test\r\n{VERSION_HEADER}: 1\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        MAX_MESSAGE_SIZE + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, text) = raw_status(&mut stream).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("over the limit"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    let server = start(http()).await;
    let mut stream = TcpStream::connect(server.http.unwrap()).await.unwrap();
    let head = format!(
        "POST /agent HTTP/1.1\r\nHost: agent.test\r\n{VERSION_HEADER}: 1\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // One chunk one byte over the limit: the agent reads all of it before
    // it can tell, so nothing is left unread when it answers.
    let len = MAX_MESSAGE_SIZE + 1;
    stream
        .write_all(format!("{len:x}\r\n").as_bytes())
        .await
        .unwrap();
    stream.write_all(&vec![b' '; len]).await.unwrap();
    stream.write_all(b"\r\n").await.unwrap();
    let (status, text) = raw_status(&mut stream).await;
    assert_eq!(status, 413, "{text}");

    // A body at the limit is read (and here refused as JSON, not as size).
    let mut body = vec![b' '; MAX_MESSAGE_SIZE - 2];
    body.splice(0..0, *b"{");
    body.push(b'}');
    let reply = call(server.http.unwrap(), post("/agent", Some("1"), body)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    server.stop().await;
}
