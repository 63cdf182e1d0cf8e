//! Reading the proxy's process-wide blocks (`system`, `limits`) and
//! `routes` into the types of `proxy.rs`; listeners and upstreams have
//! their own files. The bounds of each option are here, and listed in
//! docs/configuration.md.

use kdl::KdlNode;

use super::{
    files,
    proxy::*,
    refs::{Kind, Names},
    walk::{Walker, span::Span},
};

/// Longest timeout in milliseconds for anything that waits on a peer.
pub(super) const MAX_TIMEOUT_MS: u64 = 300_000;
/// Largest body size anything may be set to: 1 TiB.
pub(super) const MAX_BODY_BYTES: u64 = 1 << 40;
pub(super) const MAX_CONNECTIONS: u64 = 10_000_000;

const FAILURE_MODES: &[(&str, FailureMode)] =
    &[("open", FailureMode::Open), ("closed", FailureMode::Closed)];

pub(super) fn failure_mode(w: &mut Walker<'_>, node: &KdlNode) -> Option<FailureMode> {
    w.choice(node, FAILURE_MODES)
}

pub(super) fn system(w: &mut Walker<'_>, node: &KdlNode, out: &mut SystemConfig) {
    const OPTIONS: &[&str] = &[
        "worker-threads",
        "max-connections",
        "graceful-shutdown-timeout-secs",
    ];
    w.options(node, OPTIONS, &[], |w, name, child| {
        match name {
            "worker-threads" => {
                if let Some(v) = w.integer(child, 0, 1024) {
                    out.worker_threads = v as usize;
                }
            }
            "max-connections" => {
                if let Some(v) = w.integer(child, 1, MAX_CONNECTIONS) {
                    out.max_connections = v as usize;
                }
            }
            "graceful-shutdown-timeout-secs" => {
                if let Some(v) = w.secs(child, 0, 3600) {
                    out.graceful_shutdown_timeout = v;
                }
            }
            _ => return false,
        }
        true
    });
}

pub(super) fn limits(w: &mut Walker<'_>, node: &KdlNode, out: &mut LimitsConfig) {
    const OPTIONS: &[&str] = &["max-header-bytes", "max-header-count", "max-body-bytes"];
    w.options(node, OPTIONS, &[], |w, name, child| {
        match name {
            "max-header-bytes" => {
                if let Some(v) = w.integer(child, 1024, 16 << 20) {
                    out.max_header_bytes = v as usize;
                }
            }
            "max-header-count" => {
                if let Some(v) = w.integer(child, 1, 10_000) {
                    out.max_header_count = v as usize;
                }
            }
            "max-body-bytes" => {
                if let Some(v) = w.integer(child, 0, MAX_BODY_BYTES) {
                    out.max_body_bytes = v;
                }
            }
            _ => return false,
        }
        true
    });
}

pub(super) fn routes(
    w: &mut Walker<'_>,
    node: &KdlNode,
    out: &mut Vec<RouteConfig>,
    names: &mut Names,
) {
    w.options(node, &["route"], &["route"], |w, name, child| {
        if name != "route" {
            return false;
        }
        if let Some(route) = route(w, child, names) {
            out.push(route);
        }
        true
    });
}

const ROUTE_OPTIONS: &[&str] = &[
    "priority",
    "matches",
    "upstream",
    "static-response",
    "filters",
    "policies",
    "profile",
];

fn route(w: &mut Walker<'_>, node: &KdlNode, names: &mut Names) -> Option<RouteConfig> {
    let named = w.name(node, &[]);
    let label = named.as_ref().map_or("?", |(n, _)| n.as_str()).to_owned();
    if let Some((n, at)) = &named {
        names.define(Kind::Route, n, *at);
    }
    let from = format!("route '{label}'");
    let mut priority = 0;
    let mut matches = RouteMatch::default();
    let mut upstream = None;
    let mut static_response = None;
    // The action nodes as written, valid or not: (name, offset).
    let mut actions: Vec<(&'static str, usize)> = Vec::new();
    let mut filters: Vec<String> = Vec::new();
    let mut policies = RoutePolicies::default();
    let mut profile = super::RouteProfile::default();
    let mut complete = true;
    w.children(node, ROUTE_OPTIONS, Some(&[]), |w, name, child| {
        match name {
            "priority" => {
                if let Some(v) = w.signed(child, -1_000_000, 1_000_000) {
                    priority = v;
                }
            }
            "matches" => match route_match(w, child) {
                Some(m) => matches = m,
                None => complete = false,
            },
            "upstream" => {
                actions.push(("upstream", child.offset()));
                if let Some((target, at)) = w.string_at(child) {
                    names.refer(Kind::Upstream, &target, at, from.clone());
                    upstream = Some(target);
                }
            }
            "static-response" => {
                actions.push(("static-response", child.offset()));
                static_response = static_response_of(w, child);
            }
            "filters" => {
                for (filter, at) in w.strings(child) {
                    if filters.contains(&filter) {
                        w.at_offset(at, format!("filter '{filter}' is listed twice"));
                        continue;
                    }
                    names.refer(Kind::Filter, &filter, at, from.clone());
                    filters.push(filter);
                }
            }
            "policies" => policies = route_policies(w, child),
            "profile" => profile = super::read_profile::route_profile(w, child),
            _ => return false,
        }
        true
    });
    match actions.as_slice() {
        [] => w.error(
            node,
            format!("route '{label}' needs an 'upstream' or a 'static-response'"),
        ),
        [_] => {}
        [.., (_, at)] => w.at_offset(
            *at,
            format!("route '{label}' has both 'upstream' and 'static-response': give one"),
        ),
    }
    let (name, _) = named?;
    if !complete || actions.len() != 1 || (upstream.is_none() && static_response.is_none()) {
        return None;
    }
    Some(RouteConfig {
        name,
        priority,
        matches,
        upstream,
        static_response,
        filters,
        policies,
        profile,
    })
}

/// `static-response 404 "not here"`: a status and an optional body.
fn static_response_of(w: &mut Walker<'_>, node: &KdlNode) -> Option<StaticResponse> {
    w.no_children(node);
    let mut status = None;
    let mut body = String::new();
    let mut ok = true;
    for (i, entry) in node.entries().iter().enumerate() {
        if entry.name().is_some() {
            w.error(
                entry,
                "'static-response' takes a status and a body, not properties",
            );
            ok = false;
            continue;
        }
        match i {
            0 => {
                status = w
                    .entry_integer("static-response", entry, 100, 599)
                    .map(|s| s as u16)
            }
            1 => match w.entry_string("static-response", entry) {
                Some(b) => body = b,
                None => ok = false,
            },
            _ => {
                w.error(
                    entry,
                    "'static-response' takes a status and a body, nothing more",
                );
                ok = false;
            }
        }
    }
    if node.entries().is_empty() {
        w.error(
            node,
            "'static-response' needs a status, such as: static-response 404 \"not here\"",
        );
    }
    let status = status?;
    ok.then_some(StaticResponse { status, body })
}

const MATCH_OPTIONS: &[&str] = &["path-prefix", "path", "host", "method", "header"];

fn route_match(w: &mut Walker<'_>, node: &KdlNode) -> Option<RouteMatch> {
    let mut out = RouteMatch::default();
    let before = w.problems.len();
    w.options(node, MATCH_OPTIONS, &["header"], |w, name, child| {
        match name {
            "path-prefix" | "path" => {
                let mut paths = Vec::new();
                for (path, at) in w.strings(child) {
                    if path.starts_with('/') {
                        paths.push(path);
                    } else {
                        w.at_offset(at, format!("'{name}' must start with '/', found \"{path}\""));
                    }
                }
                if name == "path" {
                    out.path = paths;
                } else {
                    out.path_prefix = paths;
                }
            }
            "host" => {
                for (host, at) in w.strings(child) {
                    let host = host.to_ascii_lowercase();
                    if files::host_pattern(&host) {
                        out.host.push(host);
                    } else {
                        w.at_offset(
                            at,
                            format!("'{host}' is not a host name such as \"api.example.com\" or \"*.example.com\""),
                        );
                    }
                }
            }
            "method" => {
                for (method, at) in w.strings(child) {
                    if hyper::Method::from_bytes(method.as_bytes()).is_ok() {
                        out.method.push(method);
                    } else {
                        w.at_offset(at, format!("'{method}' is not an HTTP method"));
                    }
                }
            }
            "header" => {
                if let Some(h) = header_match(w, child) {
                    out.headers.push(h);
                }
            }
            _ => return false,
        }
        true
    });
    (w.problems.len() == before).then_some(out)
}

/// `header "x-env" "prod"` or `header "x-debug"`.
fn header_match(w: &mut Walker<'_>, node: &KdlNode) -> Option<HeaderMatch> {
    let values = w.strings(node);
    if values.len() > 2 {
        w.at_offset(values[2].1, "'header' takes a name and an optional value");
        return None;
    }
    let mut values = values.into_iter();
    let (name, at) = values.next()?;
    let name = name.to_ascii_lowercase();
    if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
        w.at_offset(at, format!("'{name}' is not a header name"));
        return None;
    }
    Some(HeaderMatch {
        name,
        value: values.next().map(|(v, _)| v),
    })
}

fn route_policies(w: &mut Walker<'_>, node: &KdlNode) -> RoutePolicies {
    const OPTIONS: &[&str] = &["failure-mode", "max-body-bytes", "timeout-secs"];
    let mut out = RoutePolicies::default();
    w.options(node, OPTIONS, &[], |w, name, child| {
        match name {
            "failure-mode" => {
                if let Some(m) = failure_mode(w, child) {
                    out.failure_mode = m;
                }
            }
            "max-body-bytes" => out.max_body_bytes = w.integer(child, 0, MAX_BODY_BYTES),
            "timeout-secs" => out.timeout = w.secs(child, 1, 86_400),
            _ => return false,
        }
        true
    });
    out
}
