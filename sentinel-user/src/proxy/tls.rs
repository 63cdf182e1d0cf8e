//! TLS with rustls (ring provider): listeners' server configurations with
//! SNI certificate selection and client authentication, and upstreams'
//! client configurations.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, ring},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use tracing::warn;

use crate::config::{CertKey, ClientAuth, ListenerTls, TlsVersion, UpstreamTls};

/// Errors from building a TLS configuration out of files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error("cannot read a private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("client CA bundle {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certs {
            path: path.to_owned(),
            reason: "no PEM certificate in the file".to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn certified_key(pair: &CertKey) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(&pair.cert_file)?;
    let key = load_key(&pair.key_file)?;
    let signing = ring::sign::any_supported_type(&key).map_err(|source| TlsError::Rustls {
        what: "unsupported private key",
        source,
    })?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|source| TlsError::Rustls {
        what: "certificate and key do not match",
        source,
    })?;
    Ok(Arc::new(ck))
}

/// Picks a certificate by SNI: exact names first, then `*.` wildcards
/// (one label), then the default.
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("exact", &self.exact.keys())
            .field("wildcard", &self.wildcard.keys())
            .finish()
    }
}

impl SniResolver {
    fn lookup(&self, name: &str) -> Arc<CertifiedKey> {
        let name = name.to_ascii_lowercase();
        if let Some(ck) = self.exact.get(&name) {
            return ck.clone();
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(ck) = self.wildcard.get(parent)
        {
            return ck.clone();
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match hello.server_name() {
            Some(name) => self.lookup(name),
            None => self.default.clone(),
        })
    }
}

/// The server configuration of an `https` listener.
pub fn server_config(cfg: &ListenerTls) -> Result<Arc<ServerConfig>, TlsError> {
    let mut resolver = SniResolver {
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        default: certified_key(&cfg.default_cert)?,
    };
    for sni in &cfg.sni {
        let ck = certified_key(&sni.cert)?;
        for name in &sni.names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => resolver.wildcard.insert(parent.to_owned(), ck.clone()),
                None => resolver.exact.insert(name, ck.clone()),
            };
        }
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match cfg.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|source| TlsError::Rustls {
            what: "TLS versions",
            source,
        })?;
    let builder = match (cfg.client_auth, &cfg.client_ca) {
        (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
        (auth, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                path: ca.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client configuration for an upstream (also used, with TLS off, for
/// plain connections through the same connector).
pub fn client_config(cfg: Option<&UpstreamTls>) -> Result<ClientConfig, TlsError> {
    client_config_for(ClientTls {
        ca_cert: cfg.and_then(|c| c.ca_cert.as_deref()),
        client_cert: cfg
            .and_then(|c| c.client_cert.as_ref())
            .map(|p| (p.cert_file.as_path(), p.key_file.as_path())),
        insecure_skip_verify: cfg.is_some_and(|c| c.insecure_skip_verify),
        peer: "upstream",
    })
}

/// What a client side of TLS verifies and presents.
pub struct ClientTls<'a> {
    /// Default: the system's roots.
    pub ca_cert: Option<&'a Path>,
    /// Certificate chain and key files, for mutual TLS.
    pub client_cert: Option<(&'a Path, &'a Path)>,
    pub insecure_skip_verify: bool,
    /// Who is at the other end, for the warning: `upstream`, `agent`.
    pub peer: &'static str,
}

/// A client configuration (ALPN is left to the caller).
pub fn client_config_for(cfg: ClientTls<'_>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "TLS versions",
            source,
        })?;
    let builder = if cfg.insecure_skip_verify {
        warn!(
            "TLS certificate verification disabled for {} connection",
            cfg.peer
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
    } else {
        let mut roots = RootCertStore::empty();
        match cfg.ca_cert {
            Some(ca) => {
                for cert in load_certs(ca)? {
                    roots.add(cert).map_err(|e| TlsError::Certs {
                        path: ca.to_owned(),
                        reason: e.to_string(),
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    warn!(%error, "problem loading the system's CA certificates");
                }
                roots.add_parsable_certificates(native.certs);
            }
        }
        builder.with_root_certificates(roots)
    };
    let config = match cfg.client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|source| TlsError::Rustls {
                what: "client certificate",
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// `insecure-skip-verify`: accepts any certificate, still checking the
/// handshake signatures so the session is at least bound to a key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
