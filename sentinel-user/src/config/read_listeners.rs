//! Reading `listeners { listener "NAME" { ... } }`, TLS and SNI
//! certificates included, into the types of `proxy.rs`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use kdl::KdlNode;

use super::{
    files::{self, Pem, pem_path},
    proxy::*,
    read_proxy::{MAX_CONNECTIONS, MAX_TIMEOUT_MS},
    refs::{Kind, Names},
    walk::{self, Walker, span::Span},
};

pub(super) fn listeners(
    w: &mut Walker<'_>,
    node: &KdlNode,
    out: &mut Vec<ListenerConfig>,
    names: &mut Names,
) {
    let mut bound: Vec<(SocketAddr, String)> = Vec::new();
    let mut quarantine: Option<String> = None;
    w.options(node, &["listener"], &["listener"], |w, name, child| {
        if name != "listener" {
            return false;
        }
        if let Some((listener, at)) = listener(w, child, names) {
            if listener.quarantine {
                match &quarantine {
                    Some(first) => w.error(
                        child,
                        format!(
                            "listener '{}' is a second quarantine listener: '{first}' already is one",
                            listener.name
                        ),
                    ),
                    None => {
                        quarantine = Some(listener.name.clone());
                        names.quarantine_at = Some(at);
                    }
                }
            }
            // Port 0 asks for any free port: two of them never clash.
            if listener.address.port() != 0 {
                let clash = bound.iter().find(|(a, _)| overlaps(*a, listener.address));
                if let Some((other_address, other)) = clash {
                    let how = if *other_address == listener.address {
                        "is already used by".to_owned()
                    } else {
                        format!("overlaps {other_address} of")
                    };
                    w.at_offset(
                        at,
                        format!(
                            "listener '{}': address {} {how} listener '{other}'",
                            listener.name, listener.address
                        ),
                    );
                }
                bound.push((listener.address, listener.name.clone()));
            }
            out.push(listener);
        }
        true
    });
}

/// Whether two listeners cannot both bind: the same port, and the same
/// address or a wildcard of the same family (`0.0.0.0:80` holds
/// `127.0.0.1:80`). Across families it depends on IPV6_V6ONLY, so that is
/// left to the bind.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

const LISTENER_OPTIONS: &[&str] = &[
    "address",
    "protocol",
    "tls",
    "header-read-timeout-ms",
    "keepalive-timeout-secs",
    "request-timeout-secs",
    "max-connections",
    "quarantine",
];

/// One listener and the offset of its address.
fn listener(
    w: &mut Walker<'_>,
    node: &KdlNode,
    names: &mut Names,
) -> Option<(ListenerConfig, usize)> {
    let named = w.name(node, &[]);
    let label = named.as_ref().map_or("?", |(n, _)| n.as_str()).to_owned();
    if let Some((n, at)) = &named {
        names.define(Kind::Listener, n, *at);
    }
    let mut address = None;
    let mut protocol = (ListenerProtocol::Http, None);
    // Whether a tls block was written, apart from whether it was valid.
    let mut tls_at = None;
    let mut tls = None;
    let mut header_read_timeout = Duration::from_secs(10);
    let mut keepalive_timeout = Duration::from_secs(75);
    let mut request_timeout = Duration::from_secs(60);
    let mut max_connections = None;
    let mut quarantine = false;
    w.children(node, LISTENER_OPTIONS, Some(&[]), |w, name, child| {
        match name {
            "address" => {
                if let Some((text, at)) = w.string_at(child) {
                    match text.parse::<SocketAddr>() {
                        Ok(a) => address = Some((a, at)),
                        Err(_) => w.at_offset(
                            at,
                            format!("'address' must be IP:PORT such as \"0.0.0.0:8080\", found \"{text}\""),
                        ),
                    }
                }
            }
            "protocol" => {
                let choices = [("http", ListenerProtocol::Http), ("https", ListenerProtocol::Https)];
                if let Some(p) = w.choice(child, &choices) {
                    protocol = (p, Some(child.offset()));
                }
            }
            "tls" => {
                tls_at = Some(child.offset());
                tls = listener_tls(w, child);
            }
            "header-read-timeout-ms" => {
                if let Some(v) = w.millis(child, 1, MAX_TIMEOUT_MS) {
                    header_read_timeout = v;
                }
            }
            "keepalive-timeout-secs" => {
                if let Some(v) = w.secs(child, 1, 3600) {
                    keepalive_timeout = v;
                }
            }
            "request-timeout-secs" => {
                if let Some(v) = w.secs(child, 0, 86_400) {
                    request_timeout = v;
                }
            }
            "max-connections" => {
                if let Some(v) = w.integer(child, 1, MAX_CONNECTIONS) {
                    max_connections = Some(v as usize);
                }
            }
            "quarantine" => {
                if let Some(v) = w.flag(child) {
                    quarantine = v;
                }
            }
            _ => return false,
        }
        true
    });
    if !walk::has_child(node, "address") {
        w.error(node, format!("listener '{label}' needs an 'address'"));
    }
    match (protocol, tls_at) {
        ((ListenerProtocol::Https, at), None) => w.at_offset(
            at.unwrap_or(node.offset()),
            format!("listener '{label}' is https but has no 'tls' block"),
        ),
        ((ListenerProtocol::Http, _), Some(at)) => w.at_offset(
            at,
            format!(
                "listener '{label}' has a 'tls' block but is not https: add protocol \"https\""
            ),
        ),
        _ => {}
    }
    let (name, _) = named?;
    let (address, at) = address?;
    if tls_at.is_some() && tls.is_none() {
        return None;
    }
    Some((
        ListenerConfig {
            name,
            address,
            protocol: protocol.0,
            tls,
            header_read_timeout,
            keepalive_timeout,
            request_timeout,
            max_connections,
            quarantine,
        },
        at,
    ))
}

/// Collects `cert-file` and `key-file` of one block; `finish` reports the
/// missing ones.
#[derive(Default)]
struct CertKeyParts {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl CertKeyParts {
    /// Takes `cert-file` / `key-file`; false for any other option.
    fn visit(&mut self, w: &mut Walker<'_>, name: &str, node: &KdlNode) -> bool {
        match name {
            "cert-file" => self.cert = pem_path(w, node, Pem::Certificates),
            "key-file" => self.key = pem_path(w, node, Pem::PrivateKey),
            _ => return false,
        }
        true
    }

    fn finish(self, w: &mut Walker<'_>, node: &KdlNode, what: &str) -> Option<CertKey> {
        for option in ["cert-file", "key-file"] {
            if !walk::has_child(node, option) {
                w.error(node, format!("{what} needs a '{option}'"));
            }
        }
        Some(CertKey {
            cert_file: self.cert?,
            key_file: self.key?,
        })
    }
}

const LISTENER_TLS_OPTIONS: &[&str] = &[
    "cert-file",
    "key-file",
    "min-version",
    "client-auth",
    "client-ca",
    "sni",
];

fn listener_tls(w: &mut Walker<'_>, node: &KdlNode) -> Option<ListenerTls> {
    let mut cert = CertKeyParts::default();
    let mut min_version = TlsVersion::V1_2;
    let mut client_auth = (ClientAuth::None, 0);
    let mut client_ca = None;
    let mut client_ca_written = false;
    let mut sni_certs = Vec::new();
    let mut complete = true;
    w.options(node, LISTENER_TLS_OPTIONS, &[], |w, name, child| {
        if cert.visit(w, name, child) {
            return true;
        }
        match name {
            "min-version" => {
                let choices = [("1.2", TlsVersion::V1_2), ("1.3", TlsVersion::V1_3)];
                if let Some(v) = w.choice(child, &choices) {
                    min_version = v;
                }
            }
            "client-auth" => {
                let choices = [
                    ("none", ClientAuth::None),
                    ("optional", ClientAuth::Optional),
                    ("required", ClientAuth::Required),
                ];
                if let Some(v) = w.choice(child, &choices) {
                    client_auth = (v, child.offset());
                }
            }
            "client-ca" => {
                client_ca_written = true;
                client_ca = pem_path(w, child, Pem::Certificates);
            }
            "sni" => match sni(w, child) {
                Some(certs) => sni_certs = certs,
                None => complete = false,
            },
            _ => return false,
        }
        true
    });
    if client_auth.0 != ClientAuth::None && !client_ca_written {
        w.at_offset(
            client_auth.1,
            "'client-auth' needs a 'client-ca' to verify client certificates against",
        );
        complete = false;
    }
    let default_cert = cert.finish(w, node, "'tls'")?;
    if !complete || (client_ca_written && client_ca.is_none()) {
        return None;
    }
    Some(ListenerTls {
        default_cert,
        sni: sni_certs,
        min_version,
        client_ca,
        client_auth: client_auth.0,
    })
}

/// `sni { certificate "a.example.com" "*.b.example.com" { cert-file ...
/// key-file ... } }`.
fn sni(w: &mut Walker<'_>, node: &KdlNode) -> Option<Vec<SniCertificate>> {
    let mut out = Vec::new();
    let mut complete = true;
    let mut taken: Vec<String> = Vec::new();
    w.options(node, &["certificate"], &["certificate"], |w, name, child| {
        if name != "certificate" {
            return false;
        }
        let mut names = Vec::new();
        for entry in child.entries() {
            if entry.name().is_some() {
                w.error(entry, "'certificate' takes server names, not properties");
                continue;
            }
            let Some(host) = w.entry_string("certificate", entry) else {
                continue;
            };
            let host = host.to_ascii_lowercase();
            if !files::host_pattern(&host) {
                w.error(
                    entry,
                    format!("'{host}' is not a server name such as \"api.example.com\" or \"*.example.com\""),
                );
            } else if taken.contains(&host) {
                w.error(entry, format!("server name '{host}' has more than one certificate"));
            } else {
                taken.push(host.clone());
                names.push(host);
            }
        }
        if child.entries().is_empty() {
            w.error(child, "'certificate' needs the server names it is for");
            complete = false;
        }
        let mut parts = CertKeyParts::default();
        w.children(child, &["cert-file", "key-file"], Some(&[]), |w, name, leaf| {
            parts.visit(w, name, leaf)
        });
        match parts.finish(w, child, "'certificate'") {
            Some(cert) if !names.is_empty() => out.push(SniCertificate { names, cert }),
            _ => complete = false,
        }
        true
    });
    complete.then_some(out)
}
