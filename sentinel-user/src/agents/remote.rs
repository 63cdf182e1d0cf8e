//! The network transports: gRPC (tonic, the `sentinel.agent.v1` service)
//! and HTTP (a JSON POST with `X-Sentinel-Protocol-Version: 1`), both with
//! TLS and mutual TLS from the agent's `ca-cert`, `client-cert`,
//! `client-key` and `insecure-skip-verify`.
//!
//! Each call is its own request (HTTP/2 multiplexes gRPC calls on one
//! connection; the HTTP client keeps a pool). The `configure` event is
//! sent before the first event and again after a failed call, since a
//! failure may mean the agent restarted.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri, header::CONTENT_TYPE};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use sentinel_agent_protocol::{
    AgentRequest, AgentResponse, ConfigureEvent, Decision, Event, MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION, VERSION_HEADER, grpc::pb,
};
use tonic::transport::{Channel, Endpoint};

use super::AgentError;
use crate::{
    config::AgentTls,
    proxy::tls::{ClientTls, client_config_for},
};

fn tls_config(tls: &AgentTls) -> Result<rustls::ClientConfig, AgentError> {
    let client_cert = match (&tls.client_cert, &tls.client_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    client_config_for(ClientTls {
        ca_cert: tls.ca_cert.as_deref(),
        client_cert,
        insecure_skip_verify: tls.insecure_skip_verify,
        peer: "agent",
    })
    .map_err(|e| AgentError::Connect {
        reason: e.to_string(),
    })
}

/// Sends `configure` once, and again after a failure.
struct Configured {
    event: ConfigureEvent,
    done: tokio::sync::Mutex<bool>,
}

impl Configured {
    async fn ensure<F, Fut>(&self, send: F) -> Result<(), AgentError>
    where
        F: FnOnce(AgentRequest) -> Fut,
        Fut: std::future::Future<Output = Result<AgentResponse, AgentError>>,
    {
        let mut done = self.done.lock().await;
        if *done {
            return Ok(());
        }
        let answer = send(AgentRequest::new(Event::Configure(self.event.clone()))).await?;
        if answer.decision != Decision::Allow {
            return Err(AgentError::Refused {
                decision: answer.decision.name(),
            });
        }
        *done = true;
        Ok(())
    }

    async fn forget(&self) {
        *self.done.lock().await = false;
    }
}

pub struct GrpcClient {
    client: pb::agent_processor_client::AgentProcessorClient<Channel>,
    configure: Configured,
}

impl GrpcClient {
    pub fn new(
        url: &str,
        tls: &AgentTls,
        connect_timeout: Duration,
        configure: ConfigureEvent,
    ) -> Result<Self, AgentError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| AgentError::Connect {
                reason: format!("{url}: {e}"),
            })?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        let channel = if url.starts_with("https://") {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls_config(tls)?)
                .https_only()
                .enable_http2()
                .build();
            endpoint.connect_with_connector_lazy(connector)
        } else {
            endpoint.connect_lazy()
        };
        let client = pb::agent_processor_client::AgentProcessorClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Self {
            client,
            configure: Configured {
                event: configure,
                done: tokio::sync::Mutex::new(false),
            },
        })
    }

    async fn call(&self, request: AgentRequest) -> Result<AgentResponse, AgentError> {
        let mut client = self.client.clone();
        let answer = client
            .process_event(pb::AgentRequest::from(&request))
            .await
            .map_err(|status| AgentError::Transport {
                reason: format!("gRPC {:?}: {}", status.code(), status.message()),
            })?;
        Ok(AgentResponse::try_from(answer.into_inner())?)
    }

    pub async fn send(&self, request: AgentRequest) -> Result<AgentResponse, AgentError> {
        let result = async {
            self.configure.ensure(|c| self.call(c)).await?;
            self.call(request).await
        }
        .await;
        if result.is_err() {
            self.configure.forget().await;
        }
        result
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct HttpClient {
    client: HttpsClient,
    uri: Uri,
    configure: Configured,
}

impl HttpClient {
    pub fn new(
        url: &str,
        tls: &AgentTls,
        connect_timeout: Duration,
        configure: ConfigureEvent,
    ) -> Result<Self, AgentError> {
        let uri: Uri = url.parse().map_err(|e| AgentError::Connect {
            reason: format!("{url}: {e}"),
        })?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(tls)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self {
            client,
            uri,
            configure: Configured {
                event: configure,
                done: tokio::sync::Mutex::new(false),
            },
        })
    }

    async fn call(&self, request: AgentRequest) -> Result<AgentResponse, AgentError> {
        let body = request.to_json();
        if body.len() > MAX_MESSAGE_SIZE {
            return Err(AgentError::TooLarge { len: body.len() });
        }
        let post = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(VERSION_HEADER, PROTOCOL_VERSION.to_string())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AgentError::Transport {
                reason: e.to_string(),
            })?;
        let response = self.client.request(post).await.map_err(|e| {
            if e.is_connect() {
                AgentError::Connect {
                    reason: format!("{}: {}", self.uri, crate::proxy::error_chain(&e)),
                }
            } else {
                AgentError::Transport {
                    reason: crate::proxy::error_chain(&e),
                }
            }
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_MESSAGE_SIZE)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    AgentError::TooLarge {
                        len: MAX_MESSAGE_SIZE + 1,
                    }
                } else {
                    AgentError::Transport {
                        reason: format!("reading the answer: {e}"),
                    }
                }
            })?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(AgentError::Transport {
                reason: format!("HTTP {status}: {}", text.trim()),
            });
        }
        Ok(AgentResponse::from_json(&body)?)
    }

    pub async fn send(&self, request: AgentRequest) -> Result<AgentResponse, AgentError> {
        let result = async {
            self.configure.ensure(|c| self.call(c)).await?;
            self.call(request).await
        }
        .await;
        if result.is_err() {
            self.configure.forget().await;
        }
        result
    }
}
