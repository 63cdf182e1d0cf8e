//! A throwaway certificate authority for the TLS tests: a CA, server and
//! client certificates it signs, written as PEM files the daemon reads, and
//! rustls client configurations that trust it.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    ClientConfig, RootCertStore, SupportedProtocolVersion,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use tempfile::TempDir;

/// A certificate and its key, in memory and as PEM files.
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

/// A CA whose files live in a temporary directory until it is dropped.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
    dir: TempDir,
}

/// A panic naming what failed, for `unwrap_or_else`.
fn fail<E: std::fmt::Display, T>(what: &str) -> impl FnOnce(E) -> T + '_ {
    move |e| panic!("{what}: {e}")
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sentinel-pki-")
            .tempdir()
            .unwrap_or_else(fail("cannot create a temporary directory"));
        let mut params =
            CertificateParams::new(Vec::<String>::new()).unwrap_or_else(fail("CA parameters"));
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap_or_else(fail("CA key"));
        let ca = CertifiedIssuer::self_signed(params, key).unwrap_or_else(fail("CA certificate"));
        let ca_file = dir.path().join(format!("{name}-ca.pem"));
        write(&ca_file, &ca.pem());
        Self { ca, ca_file, dir }
    }

    /// The CA certificate's PEM file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    fn issue(&self, stem: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params =
            CertificateParams::new(names.clone()).unwrap_or_else(fail("certificate parameters"));
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or(stem, |n| n.as_str()),
        );
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap_or_else(fail("key"));
        let cert = params
            .signed_by(&key, &self.ca)
            .unwrap_or_else(fail("certificate"));
        let cert_file = self.dir.path().join(format!("{stem}.pem"));
        let key_file = self.dir.path().join(format!("{stem}-key.pem"));
        write(&cert_file, &cert.pem());
        write(&key_file, &key.serialize_pem());
        Issued {
            cert: cert.der().clone(),
            key: key.serialize_der(),
            cert_file,
            key_file,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, stem: &str, names: &[&str]) -> Issued {
        self.issue(stem, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `name`.
    pub fn client(&self, stem: &str, name: &str) -> Issued {
        self.issue(stem, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A root store holding this CA.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.der().clone())
            .unwrap_or_else(fail("CA into a root store"));
        roots
    }

    /// A client that trusts this CA, speaks `versions`, offers `alpn` and,
    /// when given, authenticates with `identity`.
    pub fn client_config(
        &self,
        versions: &[&'static SupportedProtocolVersion],
        alpn: &[&[u8]],
        identity: Option<&Issued>,
    ) -> Arc<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap_or_else(fail("TLS versions"))
            .with_root_certificates(self.roots());
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(vec![id.cert.clone()], id.key())
                .unwrap_or_else(fail("client certificate")),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}
