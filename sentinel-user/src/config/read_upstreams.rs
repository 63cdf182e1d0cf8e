//! Reading `upstreams { upstream "NAME" { ... } }` into the types of
//! `proxy.rs`: targets, TLS to them, health checks, timeouts and pool.

use kdl::KdlNode;

use super::{
    files::{self, ClientCert, Pem, pem_path},
    proxy::*,
    read_proxy::MAX_TIMEOUT_MS,
    refs::{Kind, Names},
    walk::{self, Walker, span::Span},
};

pub(super) fn upstreams(
    w: &mut Walker<'_>,
    node: &KdlNode,
    out: &mut Vec<UpstreamConfig>,
    names: &mut Names,
) {
    w.options(node, &["upstream"], &["upstream"], |w, name, child| {
        if name != "upstream" {
            return false;
        }
        if let Some(upstream) = upstream(w, child, names) {
            out.push(upstream);
        }
        true
    });
}

const UPSTREAM_OPTIONS: &[&str] = &[
    "targets",
    "load-balancing",
    "protocol",
    "tls",
    "health-check",
    "passive-health",
    "timeouts",
    "retries",
    "connection-pool",
];

fn upstream(w: &mut Walker<'_>, node: &KdlNode, names: &mut Names) -> Option<UpstreamConfig> {
    let named = w.name(node, &[]);
    let label = named.as_ref().map_or("?", |(n, _)| n.as_str()).to_owned();
    if let Some((n, at)) = &named {
        names.define(Kind::Upstream, n, *at);
    }
    let before = w.problems.len();
    let mut targets_written = false;
    let mut targets = Vec::new();
    let mut load_balancing = LoadBalancing::RoundRobin;
    let mut protocol = UpstreamProtocol::Http1;
    let mut tls = None;
    let mut health_check = None;
    let mut passive_health = PassiveHealth::default();
    let mut timeouts = UpstreamTimeouts::default();
    let mut retries = 1;
    let mut pool = ConnectionPool::default();
    w.children(node, UPSTREAM_OPTIONS, Some(&[]), |w, name, child| {
        match name {
            "targets" => {
                targets_written = true;
                targets = upstream_targets(w, child, &label);
            }
            "load-balancing" => {
                let choices = [
                    ("round_robin", LoadBalancing::RoundRobin),
                    ("least_connections", LoadBalancing::LeastConnections),
                ];
                if let Some(v) = w.choice(child, &choices) {
                    load_balancing = v;
                }
            }
            "protocol" => {
                let choices = [
                    ("http1", UpstreamProtocol::Http1),
                    ("http2", UpstreamProtocol::Http2),
                ];
                if let Some(v) = w.choice(child, &choices) {
                    protocol = v;
                }
            }
            "tls" => tls = upstream_tls(w, child),
            "health-check" => health_check = Some(health(w, child)),
            "passive-health" => passive_health = passive(w, child),
            "timeouts" => timeouts = upstream_timeouts(w, child),
            "retries" => {
                if let Some(v) = w.integer(child, 0, u64::from(MAX_RETRIES)) {
                    retries = v as u32;
                }
            }
            "connection-pool" => pool = connection_pool(w, child),
            _ => return false,
        }
        true
    });
    if !targets_written {
        w.error(
            node,
            format!("upstream '{label}' needs at least one target: targets {{ target {{ address \"HOST:PORT\" }} }}"),
        );
    }
    let (name, _) = named?;
    (w.problems.len() == before).then_some(UpstreamConfig {
        name,
        targets,
        load_balancing,
        protocol,
        tls,
        health_check,
        passive_health,
        timeouts,
        retries,
        pool,
    })
}

fn upstream_targets(w: &mut Walker<'_>, node: &KdlNode, upstream: &str) -> Vec<TargetConfig> {
    let mut out: Vec<TargetConfig> = Vec::new();
    w.options(node, &["target"], &["target"], |w, name, child| {
        if name != "target" {
            return false;
        }
        let mut address = None;
        let mut weight = 1;
        w.options(child, &["address", "weight"], &[], |w, name, leaf| {
            match name {
                "address" => {
                    if let Some((text, at)) = w.string_at(leaf) {
                        match files::host_port(&text) {
                            Ok(()) => address = Some((text, at)),
                            Err(why) => w.at_offset(at, format!("target address {why}")),
                        }
                    }
                }
                "weight" => {
                    if let Some(v) = w.integer(leaf, 1, 1000) {
                        weight = v as u32;
                    }
                }
                _ => return false,
            }
            true
        });
        if !walk::has_child(child, "address") {
            w.error(child, "'target' needs an 'address'");
        }
        if let Some((address, at)) = address {
            if out.iter().any(|t| t.address == address) {
                w.at_offset(at, format!("target '{address}' is listed twice"));
            } else {
                out.push(TargetConfig { address, weight });
            }
        }
        true
    });
    let targets = node.children().map_or(0, |c| {
        c.nodes()
            .iter()
            .filter(|n| n.name().value() == "target")
            .count()
    });
    if targets == 0 {
        w.error(
            node,
            format!("upstream '{upstream}' needs at least one target: target {{ address \"HOST:PORT\" }}"),
        );
    }
    out
}

const UPSTREAM_TLS_OPTIONS: &[&str] = &[
    "sni",
    "ca-cert",
    "client-cert",
    "client-key",
    "insecure-skip-verify",
];

fn upstream_tls(w: &mut Walker<'_>, node: &KdlNode) -> Option<UpstreamTls> {
    let mut out = UpstreamTls {
        sni: None,
        ca_cert: None,
        client_cert: None,
        insecure_skip_verify: false,
    };
    let mut parts = ClientCert::default();
    w.options(node, UPSTREAM_TLS_OPTIONS, &[], |w, name, child| {
        if parts.visit(w, name, child) {
            return true;
        }
        match name {
            "sni" => {
                if let Some((sni, at)) = w.string_at(child) {
                    if files::host_name(&sni) {
                        out.sni = Some(sni);
                    } else {
                        w.at_offset(at, format!("'sni' must be a DNS name, found \"{sni}\""));
                    }
                }
            }
            "ca-cert" => out.ca_cert = pem_path(w, child, Pem::Certificates),
            "insecure-skip-verify" => {
                if let Some(v) = w.flag(child) {
                    out.insecure_skip_verify = v;
                }
            }
            _ => return false,
        }
        true
    });
    out.client_cert = parts.finish(w)?.map(|(cert_file, key_file)| CertKey {
        cert_file,
        key_file,
    });
    Some(out)
}

fn health(w: &mut Walker<'_>, node: &KdlNode) -> HealthCheck {
    const OPTIONS: &[&str] = &[
        "path",
        "expected-status",
        "interval-secs",
        "timeout-ms",
        "healthy-threshold",
        "unhealthy-threshold",
    ];
    let mut out = HealthCheck::default();
    let mut timeout_at = None;
    w.options(node, OPTIONS, &[], |w, name, child| {
        match name {
            "path" => {
                if let Some((path, at)) = w.string_at(child) {
                    if path.starts_with('/') {
                        out.path = path;
                    } else {
                        w.at_offset(at, format!("'path' must start with '/', found \"{path}\""));
                    }
                }
            }
            "expected-status" => {
                if let Some(v) = w.integer(child, 100, 599) {
                    out.expected_status = v as u16;
                }
            }
            "interval-secs" => {
                if let Some(v) = w.secs(child, 1, 3600) {
                    out.interval = v;
                }
            }
            "timeout-ms" => {
                if let Some(v) = w.millis(child, 1, MAX_TIMEOUT_MS) {
                    out.timeout = v;
                    timeout_at = Some(child.offset());
                }
            }
            "healthy-threshold" => {
                if let Some(v) = w.integer(child, 1, 1000) {
                    out.healthy_threshold = v as u32;
                }
            }
            "unhealthy-threshold" => {
                if let Some(v) = w.integer(child, 1, 1000) {
                    out.unhealthy_threshold = v as u32;
                }
            }
            _ => return false,
        }
        true
    });
    if out.timeout > out.interval {
        w.at_offset(
            timeout_at.unwrap_or(node.offset()),
            format!(
                "health-check 'timeout-ms' ({}) is longer than 'interval-secs' ({})",
                out.timeout.as_millis(),
                out.interval.as_secs()
            ),
        );
    }
    out
}

fn passive(w: &mut Walker<'_>, node: &KdlNode) -> PassiveHealth {
    const OPTIONS: &[&str] = &["consecutive-failures", "ejection-secs", "count-5xx"];
    let mut out = PassiveHealth::default();
    w.options(node, OPTIONS, &[], |w, name, child| {
        match name {
            "consecutive-failures" => {
                if let Some(v) = w.integer(child, 1, 1000) {
                    out.consecutive_failures = v as u32;
                }
            }
            "ejection-secs" => {
                if let Some(v) = w.secs(child, 1, 3600) {
                    out.ejection_time = v;
                }
            }
            "count-5xx" => {
                if let Some(v) = w.boolean(child) {
                    out.count_5xx = v;
                }
            }
            _ => return false,
        }
        true
    });
    out
}

fn upstream_timeouts(w: &mut Walker<'_>, node: &KdlNode) -> UpstreamTimeouts {
    const OPTIONS: &[&str] = &["connect-ms", "read-ms", "total-ms"];
    let mut out = UpstreamTimeouts::default();
    w.options(node, OPTIONS, &[], |w, name, child| {
        let (slot, max) = match name {
            "connect-ms" => (&mut out.connect, MAX_TIMEOUT_MS),
            // Long polls and slow downloads: up to an hour.
            "read-ms" => (&mut out.read, 3_600_000),
            "total-ms" => (&mut out.total, 3_600_000),
            _ => return false,
        };
        if let Some(v) = w.millis(child, 1, max) {
            *slot = v;
        }
        true
    });
    out
}

fn connection_pool(w: &mut Walker<'_>, node: &KdlNode) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    w.options(
        node,
        &["max-idle", "idle-timeout-secs"],
        &[],
        |w, name, child| {
            match name {
                "max-idle" => {
                    if let Some(v) = w.integer(child, 0, 100_000) {
                        out.max_idle = v as usize;
                    }
                }
                "idle-timeout-secs" => {
                    if let Some(v) = w.secs(child, 1, 3600) {
                        out.idle_timeout = v;
                    }
                }
                _ => return false,
            }
            true
        },
    );
    out
}
