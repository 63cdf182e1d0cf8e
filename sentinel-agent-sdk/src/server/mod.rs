//! Serving an agent: a Unix socket, gRPC and HTTP, any of them at once,
//! until a shutdown signal.
//!
//! [`AgentServer`] says what to serve; [`AgentServer::bind`] binds every
//! listener (so that a port-0 address can be read back) and returns a
//! [`BoundServer`], which serves until its shutdown future resolves, then
//! stops accepting, lets connections finish what they have in flight for
//! the drain timeout, and closes the rest.

mod grpc;
mod http;
mod tcp;
mod unix;

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    Agent,
    tls::{TlsError, TlsOptions},
};

/// Why the server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("nothing to serve: give a Unix socket, a gRPC or an HTTP address")]
    NoTransport,
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path} is in use: another process accepts connections on it")]
    SocketInUse { path: PathBuf },
    #[error("unix socket {path}: {source}")]
    UnixSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for {transport} on {addr}: {source}")]
    Bind {
        transport: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS for {transport}: {source}")]
    Tls {
        transport: &'static str,
        #[source]
        source: TlsError,
    },
    #[error("cannot wait for shutdown signals: {source}")]
    Signal {
        #[source]
        source: std::io::Error,
    },
    #[error("{reason}")]
    Arguments { reason: String },
}

/// The Unix-socket transport's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixOptions {
    pub path: PathBuf,
    /// Permission bits of the socket file. Default: `0o660`, so that the
    /// proxy reaches it through the agent's group.
    pub mode: u32,
    /// Requests of one multiplexed connection handled at once; reading
    /// waits while this many are in flight. Default: 256.
    pub max_in_flight: usize,
}

impl UnixOptions {
    pub const DEFAULT_MODE: u32 = 0o660;
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            mode: Self::DEFAULT_MODE,
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
        }
    }

    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }
}

#[derive(Debug, Clone)]
struct TcpOptions {
    addr: SocketAddr,
    tls: Option<TlsOptions>,
}

/// What to serve an agent on.
pub struct AgentServer<A> {
    agent: Arc<A>,
    unix: Option<UnixOptions>,
    grpc: Option<TcpOptions>,
    http: Option<TcpOptions>,
    drain_timeout: Duration,
}

impl<A: Agent> AgentServer<A> {
    /// How long connections may take to finish after a shutdown signal,
    /// by default.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn new(agent: A) -> Self {
        Self {
            agent: Arc::new(agent),
            unix: None,
            grpc: None,
            http: None,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// Serve the Unix-socket transport.
    pub fn unix_socket(mut self, options: UnixOptions) -> Self {
        self.unix = Some(options);
        self
    }

    /// Serve gRPC on `addr`, in plain text or with `tls`.
    pub fn grpc(mut self, addr: SocketAddr, tls: Option<TlsOptions>) -> Self {
        self.grpc = Some(TcpOptions { addr, tls });
        self
    }

    /// Serve HTTP on `addr`, in plain text or with `tls`.
    pub fn http(mut self, addr: SocketAddr, tls: Option<TlsOptions>) -> Self {
        self.http = Some(TcpOptions { addr, tls });
        self
    }

    /// How long connections may take to finish after the shutdown signal.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Binds every configured listener and reads the TLS files.
    pub async fn bind(self) -> Result<BoundServer<A>, ServerError> {
        if self.unix.is_none() && self.grpc.is_none() && self.http.is_none() {
            return Err(ServerError::NoTransport);
        }
        // TLS files first: a bad certificate should not leave a socket file
        // behind.
        let grpc_tls = tls_config(&self.grpc, "gRPC", &[b"h2"])?;
        let http_tls = tls_config(&self.http, "HTTP", &[b"h2", b"http/1.1"])?;
        let unix = match self.unix {
            Some(options) => Some(unix::bind(options)?),
            None => None,
        };
        let grpc = match &self.grpc {
            Some(t) => Some((bind_tcp("gRPC", t.addr).await?, grpc_tls)),
            None => None,
        };
        let http = match &self.http {
            Some(t) => Some((bind_tcp("HTTP", t.addr).await?, http_tls)),
            None => None,
        };
        Ok(BoundServer {
            agent: self.agent,
            unix,
            grpc,
            http,
            drain_timeout: self.drain_timeout,
        })
    }
}

fn tls_config(
    options: &Option<TcpOptions>,
    transport: &'static str,
    alpn: &[&[u8]],
) -> Result<Option<Arc<rustls::ServerConfig>>, ServerError> {
    options
        .as_ref()
        .and_then(|t| t.tls.as_ref())
        .map(|tls| {
            tls.server_config(alpn)
                .map_err(|source| ServerError::Tls { transport, source })
        })
        .transpose()
}

async fn bind_tcp(transport: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            transport,
            addr,
            source,
        })
}

type TcpBinding = (TcpListener, Option<Arc<rustls::ServerConfig>>);

/// Listeners bound, ready to serve.
pub struct BoundServer<A> {
    agent: Arc<A>,
    unix: Option<unix::Bound>,
    grpc: Option<TcpBinding>,
    http: Option<TcpBinding>,
    drain_timeout: Duration,
}

impl<A: Agent> BoundServer<A> {
    /// The Unix socket's path, when served.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.options.path.as_path())
    }

    /// The gRPC listener's address (with the port chosen for port 0).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The HTTP listener's address (with the port chosen for port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn serve(self) -> Result<(), ServerError> {
        let signal = shutdown_signal()?;
        self.serve_until(signal).await;
        Ok(())
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn serve_until(self, shutdown: impl Future<Output = ()> + Send) {
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        let name = self.agent.name().to_owned();

        if let Some(bound) = self.unix {
            info!(agent = %name, path = %bound.options.path.display(), "serving the unix socket");
            tracker.spawn(unix::serve(
                bound,
                self.agent.clone(),
                stop.clone(),
                abort.clone(),
                tracker.clone(),
            ));
        }
        if let Some((listener, tls)) = self.grpc {
            log_listening(&name, "gRPC", &listener, tls.is_some());
            let conns = tcp::accept(listener, tls, stop.clone(), tracker.clone());
            tracker.spawn(grpc::serve(
                conns,
                self.agent.clone(),
                stop.clone(),
                abort.clone(),
            ));
        }
        if let Some((listener, tls)) = self.http {
            log_listening(&name, "HTTP", &listener, tls.is_some());
            let conns = tcp::accept(listener, tls, stop.clone(), tracker.clone());
            tracker.spawn(http::serve(
                conns,
                self.agent.clone(),
                stop.clone(),
                abort.clone(),
                tracker.clone(),
            ));
        }

        shutdown.await;
        info!(agent = %name, "shutting down: no new connections, finishing those open");
        stop.cancel();
        tracker.close();
        if tokio::time::timeout(self.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                agent = %name,
                drain_timeout_secs = self.drain_timeout.as_secs_f64(),
                "connections still open after the drain timeout; closing them"
            );
            abort.cancel();
            tracker.wait().await;
        }
        info!(agent = %name, "stopped");
    }
}

fn log_listening(agent: &str, transport: &str, listener: &TcpListener, tls: bool) {
    match listener.local_addr() {
        Ok(addr) => info!(%agent, %transport, %addr, tls, "listening"),
        Err(error) => warn!(%agent, %transport, %error, "listening on an unknown address"),
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send, ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|source| ServerError::Signal { source })?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|source| ServerError::Signal { source })?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod tests;
