//! The command line every agent binary shares.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, time::Duration};

use tracing_subscriber::EnvFilter;

use crate::{Agent, AgentServer, ServerError, UnixOptions, tls::TlsOptions};

/// Where to serve: at least one of the three.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[group(id = "transport", required = true, multiple = true)]
// The doc comment is for rustdoc, not for the agent's --help.
#[command(about = None, long_about = None)]
pub struct TransportArgs {
    /// Serve the Unix-socket transport on this path (a stale socket file
    /// there is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve gRPC on this address, e.g. 127.0.0.1:50051.
    #[arg(long, value_name = "ADDR")]
    pub grpc: Option<SocketAddr>,
    /// Serve HTTP (JSON POST) on this address, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
}

/// The server's flags. An agent binary flattens them into its own parser
/// next to its own flags:
///
/// ```
/// use clap::Parser;
///
/// #[derive(Parser)]
/// struct Cli {
///     #[command(flatten)]
///     server: sentinel_agent_sdk::ServerArgs,
///     /// The agent's own flag.
///     #[arg(long)]
///     threshold: Option<u32>,
/// }
///
/// let cli = Cli::try_parse_from(["agent", "--socket", "/run/a.sock", "--threshold", "3"]).unwrap();
/// assert_eq!(cli.threshold, Some(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(about = None, long_about = None)]
pub struct ServerArgs {
    #[command(flatten)]
    pub transports: TransportArgs,
    /// Permission bits of the socket file, in octal.
    #[arg(long, value_name = "MODE", default_value = "660", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Requests of one multiplexed Unix-socket connection handled at once.
    #[arg(long, value_name = "N", default_value_t = UnixOptions::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// PEM certificate chain: serve gRPC and HTTP over TLS.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mTLS).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Log filter (`info`, `debug`, `sentinel_agent_sdk=trace`, ...);
    /// default: RUST_LOG, else `info`.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Seconds connections may take to finish after SIGTERM or SIGINT.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub drain_timeout_seconds: u64,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not a mode: octal permission bits such as 660"
        )),
    }
}

impl ServerArgs {
    /// The TLS options the flags give, for both gRPC and HTTP.
    pub fn tls(&self) -> Option<TlsOptions> {
        let (cert, key) = (self.tls_cert.as_ref()?, self.tls_key.as_ref()?);
        let tls = TlsOptions::new(cert, key);
        Some(match &self.tls_client_ca {
            Some(ca) => tls.require_client_certs(ca),
            None => tls,
        })
    }

    /// The server these flags describe.
    pub fn server<A: Agent>(&self, agent: A) -> Result<AgentServer<A>, ServerError> {
        let t = &self.transports;
        if t.socket.is_none() && t.grpc.is_none() && t.http.is_none() {
            return Err(ServerError::NoTransport);
        }
        let tls = self.tls();
        if tls.is_some() && t.grpc.is_none() && t.http.is_none() {
            return Err(ServerError::Arguments {
                reason: "--tls-cert applies to --grpc and --http, and neither is given".to_owned(),
            });
        }
        let mut server =
            AgentServer::new(agent).drain_timeout(Duration::from_secs(self.drain_timeout_seconds));
        if let Some(path) = &t.socket {
            server = server.unix_socket(
                UnixOptions::new(path)
                    .mode(self.socket_mode)
                    .max_in_flight(self.max_in_flight),
            );
        }
        if let Some(addr) = t.grpc {
            server = server.grpc(addr, tls.clone());
        }
        if let Some(addr) = t.http {
            server = server.http(addr, tls);
        }
        Ok(server)
    }

    /// Logs to stderr through `tracing`, filtered by --log-level, else
    /// RUST_LOG, else `info`. Does nothing if a subscriber is already set.
    pub fn init_tracing(&self) {
        let wanted = match &self.log_level {
            Some(level) => Some(level.clone()),
            None => std::env::var("RUST_LOG").ok(),
        };
        let filter = match wanted.as_deref().map(EnvFilter::try_new) {
            Some(Ok(filter)) => filter,
            Some(Err(e)) => {
                eprintln!("invalid log filter ({e}); logging at info");
                EnvFilter::new("info")
            }
            None => EnvFilter::new("info"),
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Serves `agent` as `args` say until SIGTERM or SIGINT.
pub async fn run<A: Agent>(agent: A, args: &ServerArgs) -> Result<(), ServerError> {
    args.server(agent)?.bind().await?.serve().await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long)]
        own: Vec<String>,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
    }

    #[test]
    fn one_transport_at_least_and_any_mix() {
        let err = parse(&[]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli = parse(&[
            "--socket",
            "/run/a.sock",
            "--grpc",
            "127.0.0.1:50051",
            "--http",
            "[::1]:8080",
            "--own",
            "x",
            "--own",
            "y",
        ])
        .unwrap();
        assert_eq!(
            cli.server.transports,
            TransportArgs {
                socket: Some("/run/a.sock".into()),
                grpc: Some("127.0.0.1:50051".parse().unwrap()),
                http: Some("[::1]:8080".parse().unwrap()),
            }
        );
        assert_eq!(cli.own, ["x", "y"]);
        assert_eq!(cli.server.socket_mode, 0o660);
        assert_eq!(cli.server.tls(), None);
        assert!(parse(&["--grpc", "not-an-address"]).is_err());
    }

    #[test]
    fn the_sdk_docs_stay_out_of_the_agents_help() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(!help.contains("flattens"), "{help}");
        assert!(!help.contains("Where to serve"), "{help}");
        assert!(help.contains("--tls-client-ca"), "{help}");
    }

    #[test]
    fn socket_mode_is_octal() {
        let cli = parse(&["--socket", "/a", "--socket-mode", "0o600"]).unwrap();
        assert_eq!(cli.server.socket_mode, 0o600);
        let cli = parse(&["--socket", "/a", "--socket-mode", "0666"]).unwrap();
        assert_eq!(cli.server.socket_mode, 0o666);
        for bad in ["9", "1000", "rw", ""] {
            assert!(
                parse(&["--socket", "/a", "--socket-mode", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tls_flags_go_together() {
        assert!(parse(&["--grpc", "127.0.0.1:1", "--tls-cert", "c.pem"]).is_err());
        assert!(parse(&["--grpc", "127.0.0.1:1", "--tls-key", "k.pem"]).is_err());
        assert!(parse(&["--grpc", "127.0.0.1:1", "--tls-client-ca", "ca.pem"]).is_err());
        let cli = parse(&[
            "--grpc",
            "127.0.0.1:1",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
        ])
        .unwrap();
        assert_eq!(
            cli.server.tls(),
            Some(TlsOptions::new("c.pem", "k.pem").require_client_certs("ca.pem"))
        );
    }

    struct Nobody;
    impl Agent for Nobody {}

    #[test]
    fn tls_without_a_tcp_transport_is_refused() {
        let cli = parse(&["--socket", "/a", "--tls-cert", "c", "--tls-key", "k"]).unwrap();
        let err = cli.server.server(Nobody).err().unwrap();
        assert!(err.to_string().contains("--tls-cert"), "{err}");
        let cli = parse(&["--socket", "/a"]).unwrap();
        assert!(cli.server.server(Nobody).is_ok());
    }
}
