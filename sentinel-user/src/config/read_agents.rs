//! Reading the `agents`, `filters` and `waf` blocks into the types of
//! `agents.rs`, with the seed's syntax, defaults and transport checks.

use std::{path::PathBuf, time::Duration};

use kdl::{KdlEntry, KdlNode, KdlValue};
use serde_json::{Map, Number, Value};

use super::{
    agents::*,
    files::{self, ClientCert, Pem},
    proxy::FailureMode,
    read_proxy::{MAX_TIMEOUT_MS, failure_mode},
    refs::{Kind, Names},
    walk::{self, Walker, span::Span},
};

/// Largest body an agent may be sent or a WAF may buffer: 1 GiB.
const MAX_AGENT_BODY_BYTES: u64 = 1 << 30;
const MAX_THRESHOLD: u64 = 10_000;

pub(super) fn agents(
    w: &mut Walker<'_>,
    node: &KdlNode,
    out: &mut Vec<AgentConfig>,
    names: &mut Names,
) {
    w.options(node, &["agent"], &["agent"], |w, name, child| {
        if name != "agent" {
            return false;
        }
        if let Some(agent) = agent(w, child, names) {
            out.push(agent);
        }
        true
    });
}

const AGENT_OPTIONS: &[&str] = &[
    "unix-socket",
    "grpc",
    "http",
    "events",
    "timeout-ms",
    "chunk-timeout-ms",
    "failure-mode",
    "circuit-breaker",
    "max-request-body-bytes",
    "max-response-body-bytes",
    "request-body-mode",
    "response-body-mode",
    "config",
    "max-concurrent-calls",
    "kernel-push",
    "guardrail-types",
];

const AGENT_TYPES: &[(&str, AgentType)] = &[
    ("waf", AgentType::Waf),
    ("auth", AgentType::Auth),
    ("rate_limit", AgentType::RateLimit),
    ("custom", AgentType::Custom),
];

const TRANSPORTS: &[&str] = &["unix-socket", "grpc", "http"];

fn agent(w: &mut Walker<'_>, node: &KdlNode, names: &mut Names) -> Option<AgentConfig> {
    let named = w.name(node, &["type"]);
    let label = named.as_ref().map_or("?", |(n, _)| n.as_str()).to_owned();
    if let Some((n, at)) = &named {
        names.define(Kind::Agent, n, *at);
    }
    let before = w.problems.len();
    let agent_type = agent_type(w, node, &label);
    let mut transports: Vec<(&str, usize)> = Vec::new();
    let mut transport = None;
    let mut events: Vec<AgentEvent> = Vec::new();
    let mut timeout = Duration::from_millis(1000);
    let mut chunk_timeout = Duration::from_millis(5000);
    let mut failure = FailureMode::Open;
    let mut circuit_breaker = CircuitBreakerConfig::default();
    let mut max_request_body_bytes = None;
    let mut max_response_body_bytes = None;
    let mut request_body_mode = BodyMode::Buffer;
    let mut response_body_mode = BodyMode::Buffer;
    let mut config = Value::Object(Map::new());
    let mut max_concurrent_calls = 100;
    let mut kernel_push = None;
    let mut guardrail_types = vec!["prompt_injection".to_owned()];
    w.children(node, AGENT_OPTIONS, Some(&[]), |w, name, child| {
        match name {
            "unix-socket" | "grpc" | "http" => {
                let which = TRANSPORTS.iter().find(|t| **t == name).copied().unwrap_or("");
                if let Some((first, _)) = transports.first() {
                    w.error(
                        child,
                        format!("agent '{label}' has more than one transport ('{first}' and '{which}'): give one"),
                    );
                }
                transports.push((which, child.offset()));
                transport = agent_transport(w, child, &label);
            }
            "events" => {
                for (event, at) in w.strings(child) {
                    let known = AgentEvent::ALL.iter().find(|(n, _)| *n == event);
                    match known {
                        Some((_, e)) if events.contains(e) => {
                            w.at_offset(at, format!("event '{event}' is listed twice"));
                        }
                        Some((_, e)) => events.push(*e),
                        None => {
                            let names: Vec<&str> = AgentEvent::ALL.iter().map(|(n, _)| *n).collect();
                            let hint = match walk::did_you_mean(&event, &names) {
                                Some(best) => format!(" (did you mean '{best}'?)"),
                                None => format!(" (one of: {})", names.join(", ")),
                            };
                            w.at_offset(at, format!("unknown event '{event}'{hint}"));
                        }
                    }
                }
            }
            "timeout-ms" => {
                if let Some(v) = w.millis(child, 1, MAX_TIMEOUT_MS) {
                    timeout = v;
                }
            }
            "chunk-timeout-ms" => {
                if let Some(v) = w.millis(child, 1, MAX_TIMEOUT_MS) {
                    chunk_timeout = v;
                }
            }
            "failure-mode" => {
                if let Some(m) = failure_mode(w, child) {
                    failure = m;
                }
            }
            "circuit-breaker" => circuit_breaker = breaker(w, child),
            "max-request-body-bytes" => {
                max_request_body_bytes = w.integer(child, 1, MAX_AGENT_BODY_BYTES);
            }
            "max-response-body-bytes" => {
                max_response_body_bytes = w.integer(child, 1, MAX_AGENT_BODY_BYTES);
            }
            "request-body-mode" => {
                if let Some(m) = body_mode(w, child) {
                    request_body_mode = m;
                }
            }
            "response-body-mode" => {
                if let Some(m) = body_mode(w, child) {
                    response_body_mode = m;
                }
            }
            "config" => {
                w.no_entries(child);
                config = Value::Object(json_object(w, child));
            }
            "max-concurrent-calls" => {
                if let Some(v) = w.integer(child, 1, 100_000) {
                    max_concurrent_calls = v as usize;
                }
            }
            "kernel-push" => kernel_push = Some(kernel_push_block(w, child)),
            "guardrail-types" => {
                let mut types = Vec::new();
                for (t, at) in w.strings(child) {
                    if !GUARDRAIL_TYPES.contains(&t.as_str()) {
                        w.at_offset(
                            at,
                            format!("unknown guardrail type '{t}' (one of: {})", GUARDRAIL_TYPES.join(", ")),
                        );
                    } else if types.contains(&t) {
                        w.at_offset(at, format!("guardrail type '{t}' is listed twice"));
                    } else {
                        types.push(t);
                    }
                }
                guardrail_types = types;
            }
            _ => return false,
        }
        true
    });
    if transports.is_empty() {
        w.error(
            node,
            format!("agent '{label}' needs a transport: 'unix-socket', 'grpc' or 'http'"),
        );
    }
    let (name, _) = named?;
    if w.problems.len() != before {
        return None;
    }
    Some(AgentConfig {
        name,
        agent_type: agent_type?,
        transport: transport?,
        events,
        timeout,
        chunk_timeout,
        failure_mode: failure,
        circuit_breaker,
        max_request_body_bytes,
        max_response_body_bytes,
        request_body_mode,
        response_body_mode,
        config,
        max_concurrent_calls,
        kernel_push,
        guardrail_types,
    })
}

/// What `guardrail_inspect` events can ask an agent to look for.
pub const GUARDRAIL_TYPES: &[&str] = &["prompt_injection", "pii_detection"];

/// `kernel-push { max-ttl-seconds N; min-prefix-length-v4 N; min-prefix-length-v6 N }`.
fn kernel_push_block(w: &mut Walker<'_>, node: &KdlNode) -> KernelPushConfig {
    const OPTIONS: &[&str] = &[
        "max-ttl-seconds",
        "min-prefix-length-v4",
        "min-prefix-length-v6",
    ];
    let mut out = KernelPushConfig::default();
    w.no_entries(node);
    w.options(node, OPTIONS, &[], |w, name, child| {
        match name {
            "max-ttl-seconds" => {
                if let Some(v) = w.secs(child, 1, 365 * 86_400) {
                    out.max_ttl = v;
                }
            }
            // A /0 would deny everyone; /8 is the broadest a push may name.
            "min-prefix-length-v4" => {
                if let Some(v) = w.integer(child, 8, 32) {
                    out.min_prefix_len_v4 = v as u8;
                }
            }
            "min-prefix-length-v6" => {
                if let Some(v) = w.integer(child, 16, 128) {
                    out.min_prefix_len_v6 = v as u8;
                }
            }
            _ => return false,
        }
        true
    });
    out
}

/// The `type="..."` property.
fn agent_type(w: &mut Walker<'_>, node: &KdlNode, label: &str) -> Option<AgentType> {
    let entry = node
        .entries()
        .iter()
        .find(|e| e.name().is_some_and(|n| n.value() == "type"));
    let Some(entry) = entry else {
        w.error(
            node,
            format!(
                "agent '{label}' needs a type: type=\"waf\", \"auth\", \"rate_limit\" or \"custom\""
            ),
        );
        return None;
    };
    let value = w.entry_string("type", entry)?;
    match AGENT_TYPES.iter().find(|(n, _)| *n == value) {
        Some((_, t)) => Some(*t),
        None => {
            w.error(
                entry,
                format!("agent type must be \"waf\", \"auth\", \"rate_limit\" or \"custom\", found \"{value}\""),
            );
            None
        }
    }
}

/// `unix-socket "PATH"`, `grpc "URL" { tls... }` or `http "URL" { tls... }`,
/// checked as the seed says.
fn agent_transport(w: &mut Walker<'_>, node: &KdlNode, agent: &str) -> Option<AgentTransport> {
    let kind = node.name().value();
    let mut entries = node.entries().iter();
    let Some(entry) = entries.next() else {
        w.error(node, format!("'{kind}' needs an address"));
        return None;
    };
    for extra in entries {
        w.error(extra, format!("'{kind}' takes one address"));
    }
    if entry.name().is_some() {
        w.error(entry, format!("'{kind}' takes an address, not a property"));
        return None;
    }
    let address = w.entry_string(kind, entry)?;
    let at = entry.span().offset();
    if kind == "unix-socket" {
        w.no_children(node);
        files::agent_socket(w, at, agent, &address);
        return Some(AgentTransport::UnixSocket(PathBuf::from(address)));
    }
    let proto = if kind == "grpc" { "gRPC" } else { "HTTP" };
    let https = files::http_url(&address);
    if https.is_none() {
        w.at_offset(
            at,
            format!("Agent '{agent}' {proto} address '{address}' is not a valid URL"),
        );
    }
    let tls = agent_tls(w, node);
    if https == Some(false) && node.children().is_some_and(|c| !c.nodes().is_empty()) {
        w.at_offset(
            at,
            format!("agent '{agent}': TLS options need an https:// address, found '{address}'"),
        );
    }
    let url = https.map(|_| address)?;
    let tls = tls?;
    Some(if kind == "grpc" {
        AgentTransport::Grpc { url, tls }
    } else {
        AgentTransport::Http { url, tls }
    })
}

const AGENT_TLS_OPTIONS: &[&str] = &[
    "ca-cert",
    "client-cert",
    "client-key",
    "insecure-skip-verify",
];

/// The block under `grpc "URL" { ... }` / `http "URL" { ... }`.
pub(super) fn agent_tls(w: &mut Walker<'_>, node: &KdlNode) -> Option<AgentTls> {
    let mut out = AgentTls::default();
    let mut client = ClientCert::default();
    let mut ok = true;
    w.children(node, AGENT_TLS_OPTIONS, Some(&[]), |w, name, child| {
        if client.visit(w, name, child) {
            return true;
        }
        match name {
            "ca-cert" => match w.string_at(child) {
                Some((path, at)) => {
                    files::pem_file(w, at, "ca-cert", &path, Pem::Certificates);
                    out.ca_cert = Some(PathBuf::from(path));
                }
                None => ok = false,
            },
            "insecure-skip-verify" => match w.flag(child) {
                Some(v) => out.insecure_skip_verify = v,
                None => ok = false,
            },
            _ => return false,
        }
        true
    });
    if let Some((cert, key)) = client.finish(w)? {
        out.client_cert = Some(cert);
        out.client_key = Some(key);
    }
    ok.then_some(out)
}

/// `circuit-breaker { ... }`: every threshold and the timeout at least 1.
fn breaker(w: &mut Walker<'_>, node: &KdlNode) -> CircuitBreakerConfig {
    const OPTIONS: &[&str] = &[
        "failure-threshold",
        "success-threshold",
        "timeout-seconds",
        "half-open-max-requests",
    ];
    let mut out = CircuitBreakerConfig::default();
    w.options(node, OPTIONS, &[], |w, name, child| {
        let slot = match name {
            "failure-threshold" => &mut out.failure_threshold,
            "success-threshold" => &mut out.success_threshold,
            "half-open-max-requests" => &mut out.half_open_max_requests,
            "timeout-seconds" => {
                if let Some(v) = w.secs(child, 1, 3600) {
                    out.timeout = v;
                }
                return true;
            }
            _ => return false,
        };
        if let Some(v) = w.integer(child, 1, MAX_THRESHOLD) {
            *slot = v as u32;
        }
        true
    });
    out
}

/// `"buffer"`, `"stream"` or `"hybrid:<bytes>"`.
fn body_mode(w: &mut Walker<'_>, node: &KdlNode) -> Option<BodyMode> {
    let what = node.name().value();
    let (text, at) = w.string_at(node)?;
    match text.as_str() {
        "buffer" => return Some(BodyMode::Buffer),
        "stream" => return Some(BodyMode::Stream),
        _ => {}
    }
    if let Some(bytes) = text.strip_prefix("hybrid:") {
        match bytes.parse::<u64>() {
            Ok(n) if (1..=MAX_AGENT_BODY_BYTES).contains(&n) => return Some(BodyMode::Hybrid(n)),
            Ok(n) => w.at_offset(
                at,
                format!("'{what}' hybrid threshold must be between 1 and {MAX_AGENT_BODY_BYTES} bytes, found {n}"),
            ),
            Err(_) => w.at_offset(
                at,
                format!("'{what}' hybrid threshold must be a number of bytes, such as \"hybrid:65536\", found \"{text}\""),
            ),
        }
        return None;
    }
    w.at_offset(
        at,
        format!("'{what}' must be \"buffer\", \"stream\" or \"hybrid:<bytes>\", found \"{text}\""),
    );
    None
}

/// The children of `node` as a JSON object: each child a key.
fn json_object(w: &mut Walker<'_>, node: &KdlNode) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(children) = node.children() else {
        return out;
    };
    // Keys whose value was refused count too, so that a second one is
    // still reported.
    let mut seen: Vec<&str> = Vec::new();
    for child in children.nodes() {
        let key = child.name().value();
        let value = json_node(w, child);
        if seen.contains(&key) {
            w.error(
                child,
                format!("key '{key}' appears twice in '{}'", node.name().value()),
            );
            continue;
        }
        seen.push(key);
        if let Some(value) = value {
            out.insert(key.to_owned(), value);
        }
    }
    out
}

/// One node of a `config` block: no value is null, one value is that
/// value, several an array; properties and children make an object.
fn json_node(w: &mut Walker<'_>, node: &KdlNode) -> Option<Value> {
    let key = node.name().value();
    let (props, args): (Vec<&KdlEntry>, Vec<&KdlEntry>) =
        node.entries().iter().partition(|e| e.name().is_some());
    let has_children = node.children().is_some();
    if !args.is_empty() && (has_children || !props.is_empty()) {
        w.error(
            node,
            format!("'{key}' takes values, or properties and a {{ ... }} block, not both"),
        );
        return None;
    }
    if has_children || !props.is_empty() {
        let mut object = Map::new();
        for entry in props {
            let name = entry.name().map_or("", |n| n.value());
            let value = json_value(w, key, entry)?;
            if object.insert(name.to_owned(), value).is_some() {
                w.error(entry, format!("key '{name}' appears twice in '{key}'"));
            }
        }
        for (name, value) in json_object(w, node) {
            if object.contains_key(&name) {
                w.error(node, format!("key '{name}' appears twice in '{key}'"));
            } else {
                object.insert(name, value);
            }
        }
        return Some(Value::Object(object));
    }
    let mut values = Vec::new();
    for entry in &args {
        values.push(json_value(w, key, entry)?);
    }
    Some(match values.len() {
        0 => Value::Null,
        1 => values.pop().unwrap_or(Value::Null),
        _ => Value::Array(values),
    })
}

fn json_value(w: &mut Walker<'_>, key: &str, entry: &KdlEntry) -> Option<Value> {
    Some(match entry.value() {
        KdlValue::String(s) => Value::String(s.clone()),
        KdlValue::Bool(b) => Value::Bool(*b),
        KdlValue::Null => Value::Null,
        KdlValue::Integer(i) => {
            let number = i64::try_from(*i)
                .map(Number::from)
                .or_else(|_| u64::try_from(*i).map(Number::from));
            match number {
                Ok(n) => Value::Number(n),
                Err(_) => {
                    w.error(entry, format!("'{key}': {i} does not fit in 64 bits"));
                    return None;
                }
            }
        }
        KdlValue::Float(f) => match Number::from_f64(*f) {
            Some(n) => Value::Number(n),
            None => {
                w.error(entry, format!("'{key}': {f} has no JSON form"));
                return None;
            }
        },
    })
}

pub(super) fn filters(
    w: &mut Walker<'_>,
    node: &KdlNode,
    out: &mut Vec<FilterConfig>,
    names: &mut Names,
) {
    w.options(node, &["filter"], &["filter"], |w, name, child| {
        if name != "filter" {
            return false;
        }
        if let Some(filter) = filter(w, child, names) {
            out.push(filter);
        }
        true
    });
}

const FILTER_OPTIONS: &[&str] = &["type", "agent", "phase", "timeout-ms", "failure-mode"];

fn filter(w: &mut Walker<'_>, node: &KdlNode, names: &mut Names) -> Option<FilterConfig> {
    let named = w.name(node, &[]);
    let label = named.as_ref().map_or("?", |(n, _)| n.as_str()).to_owned();
    if let Some((n, at)) = &named {
        names.define(Kind::Filter, n, *at);
    }
    let before = w.problems.len();
    let mut agent = None;
    let mut phase = FilterPhase::Request;
    let mut timeout = None;
    let mut failure = None;
    w.children(node, FILTER_OPTIONS, Some(&[]), |w, name, child| {
        match name {
            // The only type today; written in the seed's examples.
            "type" => {
                w.choice(child, &[("agent", ())]);
            }
            "agent" => {
                if let Some((target, at)) = w.string_at(child) {
                    names.refer(Kind::Agent, &target, at, format!("filter '{label}'"));
                    agent = Some(target);
                }
            }
            "phase" => {
                let choices = [
                    ("request", FilterPhase::Request),
                    ("response", FilterPhase::Response),
                    ("both", FilterPhase::Both),
                ];
                if let Some(p) = w.choice(child, &choices) {
                    phase = p;
                }
            }
            "timeout-ms" => timeout = w.millis(child, 1, MAX_TIMEOUT_MS),
            "failure-mode" => failure = failure_mode(w, child),
            _ => return false,
        }
        true
    });
    if !walk::has_child(node, "agent") {
        w.error(node, format!("filter '{label}' needs an 'agent'"));
    }
    let (name, _) = named?;
    if w.problems.len() != before {
        return None;
    }
    Some(FilterConfig {
        name,
        agent: agent?,
        phase,
        timeout,
        failure_mode: failure,
    })
}

pub(super) fn waf(w: &mut Walker<'_>, node: &KdlNode, out: &mut WafConfig) {
    w.options(
        node,
        &["body-inspection", "challenge"],
        &[],
        |w, name, child| {
            match name {
                "body-inspection" => body_inspection(w, child, &mut out.body_inspection),
                "challenge" => challenge(w, child, &mut out.challenge),
                _ => return false,
            }
            true
        },
    );
}

const CHALLENGE_OPTIONS: &[&str] = &[
    "status",
    "page",
    "cookie-name",
    "ttl-seconds",
    "difficulty",
    "secret-file",
];

fn challenge(w: &mut Walker<'_>, node: &KdlNode, out: &mut ChallengeConfig) {
    w.options(node, CHALLENGE_OPTIONS, &[], |w, name, child| {
        match name {
            "status" => {
                if let Some(v) = w.integer(child, 200, 599) {
                    out.status = v as u16;
                }
            }
            "page" => {
                if let Some((path, at)) = w.string_at(child) {
                    files::readable(w, at, "page", &path);
                    out.page = Some(PathBuf::from(path));
                }
            }
            "secret-file" => {
                if let Some((path, at)) = w.string_at(child) {
                    files::readable(w, at, "secret-file", &path);
                    out.secret_file = Some(PathBuf::from(path));
                }
            }
            "cookie-name" => {
                if let Some((cookie, at)) = w.string_at(child) {
                    let token = !cookie.is_empty()
                        && cookie
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
                    if token {
                        out.cookie_name = cookie;
                    } else {
                        w.at_offset(
                            at,
                            format!("'cookie-name' must be letters, digits, '_', '-' or '.', found \"{cookie}\""),
                        );
                    }
                }
            }
            "ttl-seconds" => {
                if let Some(v) = w.secs(child, 1, 30 * 86_400) {
                    out.ttl = v;
                }
            }
            "difficulty" => {
                if let Some(v) = w.integer(child, 0, 32) {
                    out.difficulty = v as u8;
                }
            }
            _ => return false,
        }
        true
    });
}

const BODY_INSPECTION_OPTIONS: &[&str] = &[
    "inspect-request-body",
    "inspect-response-body",
    "max-body-inspection-bytes",
    "content-types",
    "decompress",
    "max-decompression-ratio",
    "max-decompressed-bytes",
];

fn body_inspection(w: &mut Walker<'_>, node: &KdlNode, out: &mut BodyInspection) {
    w.options(node, BODY_INSPECTION_OPTIONS, &[], |w, name, child| {
        match name {
            "inspect-request-body" => {
                if let Some(v) = w.boolean(child) {
                    out.inspect_request_body = v;
                }
            }
            "inspect-response-body" => {
                if let Some(v) = w.boolean(child) {
                    out.inspect_response_body = v;
                }
            }
            "decompress" => {
                if let Some(v) = w.boolean(child) {
                    out.decompress = v;
                }
            }
            "max-body-inspection-bytes" => {
                if let Some(v) = w.integer(child, 1, MAX_AGENT_BODY_BYTES) {
                    out.max_body_inspection_bytes = v;
                }
            }
            "max-decompressed-bytes" => {
                if let Some(v) = w.integer(child, 1, MAX_AGENT_BODY_BYTES) {
                    out.max_decompressed_bytes = v;
                }
            }
            "max-decompression-ratio" => {
                if let Some((ratio, at)) = w.float(child) {
                    if ratio > 1.0 {
                        out.max_decompression_ratio = ratio;
                    } else {
                        w.at_offset(
                            at,
                            format!("'max-decompression-ratio' must be greater than 1.0, found {ratio:?}"),
                        );
                    }
                }
            }
            "content-types" => {
                let mut types = Vec::new();
                for (t, at) in w.strings(child) {
                    let t = t.to_ascii_lowercase();
                    let valid = t.split_once('/').is_some_and(|(a, b)| {
                        !a.is_empty() && !b.is_empty() && !t.contains([' ', ';', ','])
                    });
                    if !valid {
                        w.at_offset(at, format!("'{t}' is not a content type such as \"application/json\""));
                    } else if types.contains(&t) {
                        w.at_offset(at, format!("content type '{t}' is listed twice"));
                    } else {
                        types.push(t);
                    }
                }
                out.content_types = types;
            }
            _ => return false,
        }
        true
    });
}
