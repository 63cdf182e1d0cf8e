//! Checks of what the configuration names outside itself: TLS files that
//! must hold PEM, agents' Unix sockets, agents' URLs, `host:port`
//! addresses. Run at validation, so that `sentinel --validate` catches them
//! before a start or a reload does.

use std::{io::ErrorKind, os::unix::fs::FileTypeExt, path::PathBuf};

use kdl::KdlNode;

use rustls_pki_types::{
    CertificateDer, PrivateKeyDer,
    pem::{self, PemObject},
};

use super::walk::{Walker, span::Span};

/// What a PEM file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pem {
    /// At least one `CERTIFICATE` section (a chain or a CA bundle).
    Certificates,
    /// A private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Reports, at `offset`, a file named by `option` that cannot be read or
/// does not hold what `pem` says.
pub(super) fn pem_file(w: &mut Walker<'_>, offset: usize, option: &str, path: &str, want: Pem) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            let why = match e.kind() {
                ErrorKind::NotFound => "does not exist".to_owned(),
                ErrorKind::PermissionDenied => "cannot be read: permission denied".to_owned(),
                _ => format!("cannot be read: {e}"),
            };
            w.at_offset(offset, format!("'{option}' file '{path}' {why}"));
            return;
        }
    };
    let result = match want {
        Pem::Certificates => {
            let mut found = Ok(0usize);
            for item in CertificateDer::pem_slice_iter(&bytes) {
                match item {
                    Ok(_) => found = found.map(|n| n + 1),
                    Err(e) => {
                        found = Err(e);
                        break;
                    }
                }
            }
            match found {
                Ok(0) => Err(pem::Error::NoItemsFound),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Pem::PrivateKey => PrivateKeyDer::from_pem_slice(&bytes).map(drop),
    };
    let message = match result {
        Ok(()) => return,
        Err(pem::Error::NoItemsFound) => match want {
            Pem::Certificates => format!("'{option}' file '{path}' holds no PEM certificate"),
            Pem::PrivateKey => format!("'{option}' file '{path}' holds no PEM private key"),
        },
        Err(e) => format!(
            "'{option}' file '{path}' is not valid PEM: {}",
            describe(&e)
        ),
    };
    w.at_offset(offset, message);
}

/// Reports, at `offset`, a file named by `option` that cannot be read.
pub(super) fn readable(w: &mut Walker<'_>, offset: usize, option: &str, path: &str) {
    if let Err(e) = std::fs::File::open(path) {
        let why = match e.kind() {
            ErrorKind::NotFound => "does not exist".to_owned(),
            ErrorKind::PermissionDenied => "cannot be read: permission denied".to_owned(),
            _ => format!("cannot be read: {e}"),
        };
        w.at_offset(offset, format!("'{option}' file '{path}' {why}"));
    }
}

/// pem::Error's own text prints byte vectors; say it in words.
fn describe(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line".to_owned(),
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed".to_owned(),
        pem::Error::Base64Decode(_) => "a section is not valid base64".to_owned(),
        pem::Error::SectionTooLarge => "a section is larger than 256 MB".to_owned(),
        other => other.to_string(),
    }
}

/// The seed's check of a `unix-socket` transport: the path exists and is a
/// socket, in the seed's words.
pub(super) fn agent_socket(w: &mut Walker<'_>, offset: usize, agent: &str, path: &str) {
    let message = match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => return,
        Ok(_) => format!("Agent '{agent}' path '{path}' exists but is not a socket"),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            format!("Agent '{agent}' socket path '{path}' does not exist")
        }
        Err(e) => format!("Agent '{agent}' socket path '{path}' cannot be checked: {e}"),
    };
    w.at_offset(offset, message);
}

/// Whether `url` is `http://` or `https://` with a host; `Some(true)` for
/// https.
pub(super) fn http_url(url: &str) -> Option<bool> {
    let uri: hyper::Uri = url.parse().ok()?;
    let https = match uri.scheme_str()? {
        "http" => false,
        "https" => true,
        _ => return None,
    };
    uri.host().filter(|h| !h.is_empty())?;
    Some(https)
}

/// `host:port`, where host is an IPv4 address, a bracketed IPv6 address or
/// a DNS name, and port is 1 to 65535.
pub(super) fn host_port(address: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "'{address}' is not host:port (such as \"10.0.0.1:8080\" or \"backend.internal:8080\")"
        )
    };
    if let Ok(addr) = address.parse::<std::net::SocketAddr>() {
        return if addr.port() == 0 {
            Err(format!("'{address}': port 0 cannot be connected to"))
        } else {
            Ok(())
        };
    }
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!("'{address}': port 0 cannot be connected to"));
    }
    if host_name(host) { Ok(()) } else { Err(bad()) }
}

/// A DNS name: dot-separated labels of letters, digits and hyphens, none
/// empty or starting or ending with a hyphen.
pub(super) fn host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A name to match against SNI or the Host header: a DNS name, or `*.`
/// followed by one.
pub(super) fn host_pattern(name: &str) -> bool {
    host_name(name.strip_prefix("*.").unwrap_or(name))
}

/// A PEM file option (`cert-file`, `ca-cert`, ...): its path, once the
/// file is checked to hold `want`.
pub(super) fn pem_path(w: &mut Walker<'_>, node: &KdlNode, want: Pem) -> Option<PathBuf> {
    let (path, at) = w.string_at(node)?;
    pem_file(w, at, node.name().value(), &path, want);
    Some(PathBuf::from(path))
}

/// `client-cert` and `client-key` of a TLS client (upstream or agent):
/// both or neither.
#[derive(Default)]
pub(super) struct ClientCert {
    cert: Option<(Option<PathBuf>, usize)>,
    key: Option<(Option<PathBuf>, usize)>,
}

impl ClientCert {
    /// Takes `client-cert` / `client-key`; false for any other option.
    pub(super) fn visit(&mut self, w: &mut Walker<'_>, name: &str, node: &KdlNode) -> bool {
        match name {
            "client-cert" => {
                self.cert = Some((pem_path(w, node, Pem::Certificates), node.offset()))
            }
            "client-key" => self.key = Some((pem_path(w, node, Pem::PrivateKey), node.offset())),
            _ => return false,
        }
        true
    }

    /// The certificate and key, `Some(None)` when neither was written, or
    /// `None` after reporting one without the other (or a bad value).
    pub(super) fn finish(self, w: &mut Walker<'_>) -> Option<Option<(PathBuf, PathBuf)>> {
        match (self.cert, self.key) {
            (Some((_, at)), None) => {
                w.at_offset(at, "'client-cert' needs a 'client-key'");
                None
            }
            (None, Some((_, at))) => {
                w.at_offset(at, "'client-key' needs a 'client-cert'");
                None
            }
            (Some((cert, _)), Some((key, _))) => Some(Some((cert?, key?))),
            (None, None) => Some(None),
        }
    }
}
