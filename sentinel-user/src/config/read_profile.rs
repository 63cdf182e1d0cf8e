//! Reading the `profile` block and routes' `profile` overrides into the
//! types of `profile.rs`.

use std::path::PathBuf;

use kdl::KdlNode;

use super::{
    files,
    profile::*,
    read_agents::agent_tls,
    read_proxy::MAX_TIMEOUT_MS,
    walk::{Walker, span::Span},
};

const MODES: [(&str, ProfileMode); 4] = [
    ("off", ProfileMode::Off),
    ("lite", ProfileMode::Lite),
    ("monitor", ProfileMode::Monitor),
    ("protection", ProfileMode::Protection),
];

const PROFILE_OPTIONS: &[&str] = &[
    "mode",
    "secure-response-headers",
    "secure-headers",
    "metadata",
    "store",
    "collector",
];

pub(super) fn profile(w: &mut Walker<'_>, node: &KdlNode, out: &mut ProfileConfig) {
    let mut collector_at = None;
    w.options(node, PROFILE_OPTIONS, &[], |w, name, child| {
        match name {
            "mode" => {
                if let Some(mode) = w.choice(child, &MODES) {
                    out.mode = mode;
                }
            }
            "secure-response-headers" => {
                if let Some(v) = w.boolean(child) {
                    out.secure_response_headers = v;
                }
            }
            "secure-headers" => secure_headers(w, child, &mut out.secure_headers),
            "metadata" => metadata(w, child, &mut out.metadata),
            "store" => out.store = store(w, child),
            "collector" => {
                collector_at = Some(child.offset());
                out.collector = collector(w, child);
            }
            _ => return false,
        }
        true
    });
    if let Some(at) = collector_at
        && out.store.is_none()
    {
        w.at_offset(
            at,
            "'collector' needs a 'store' in 'profile': records wait there while the collector is down",
        );
    }
}

/// A route's `profile { mode "..."; secure-response-headers #true }`.
pub(super) fn route_profile(w: &mut Walker<'_>, node: &KdlNode) -> RouteProfile {
    let mut out = RouteProfile::default();
    w.options(
        node,
        &["mode", "secure-response-headers"],
        &[],
        |w, name, child| {
            match name {
                "mode" => out.mode = w.choice(child, &MODES),
                "secure-response-headers" => out.secure_response_headers = w.boolean(child),
                _ => return false,
            }
            true
        },
    );
    out
}

const SECURE_HEADER_OPTIONS: &[&str] = &[
    "x-frame-options",
    "x-content-type-options",
    "referrer-policy",
    "permissions-policy",
    "cross-origin-opener-policy",
    "strict-transport-security",
    "override",
];

fn secure_headers(w: &mut Walker<'_>, node: &KdlNode, out: &mut SecureHeaders) {
    w.options(node, SECURE_HEADER_OPTIONS, &[], |w, name, child| {
        let slot = match name {
            "x-frame-options" => &mut out.x_frame_options,
            "x-content-type-options" => &mut out.x_content_type_options,
            "referrer-policy" => &mut out.referrer_policy,
            "permissions-policy" => &mut out.permissions_policy,
            "cross-origin-opener-policy" => &mut out.cross_origin_opener_policy,
            "strict-transport-security" => &mut out.strict_transport_security,
            "override" => {
                if let Some(v) = w.boolean(child) {
                    out.override_upstream = v;
                }
                return true;
            }
            _ => return false,
        };
        if let Some((value, at)) = w.string_at(child) {
            if http::HeaderValue::from_str(&value).is_ok() {
                *slot = value;
            } else {
                w.at_offset(at, format!("'{name}' is not a valid header value"));
            }
        }
        true
    });
}

const METADATA_OPTIONS: &[&str] = &[
    "agent-id",
    "agent-name",
    "body-bytes",
    "file-content-bytes",
    "redact-headers",
    "redact-fields",
    "host-sample-interval-secs",
];

fn metadata(w: &mut Walker<'_>, node: &KdlNode, out: &mut MetadataConfig) {
    w.options(node, METADATA_OPTIONS, &[], |w, name, child| {
        match name {
            "agent-id" => out.agent_id = w.string_at(child).map(|(s, _)| s),
            "agent-name" => {
                if let Some((s, _)) = w.string_at(child) {
                    out.agent_name = s;
                }
            }
            "body-bytes" => {
                if let Some(v) = w.integer(child, 0, 1 << 20) {
                    out.body_bytes = v;
                }
            }
            "file-content-bytes" => {
                if let Some(v) = w.integer(child, 0, 10 << 20) {
                    out.file_content_bytes = v;
                }
            }
            "redact-headers" => {
                out.redact_headers = w
                    .strings(child)
                    .into_iter()
                    .map(|(s, _)| s.to_ascii_lowercase())
                    .collect();
            }
            "redact-fields" => {
                out.redact_fields = w
                    .strings(child)
                    .into_iter()
                    .map(|(s, _)| s.to_ascii_lowercase())
                    .collect();
            }
            "host-sample-interval-secs" => {
                if let Some(v) = w.secs(child, 1, 3600) {
                    out.host_sample_interval = v;
                }
            }
            _ => return false,
        }
        true
    });
}

const STORE_OPTIONS: &[&str] = &[
    "path",
    "max-file-bytes",
    "max-files",
    "queue-capacity",
    "fsync-interval-ms",
];

fn store(w: &mut Walker<'_>, node: &KdlNode) -> Option<StoreConfig> {
    let mut path = None;
    let mut out = StoreConfig {
        path: PathBuf::new(),
        max_file_bytes: 64 << 20,
        max_files: 8,
        queue_capacity: 10_000,
        fsync_interval: std::time::Duration::from_millis(1000),
    };
    w.options(node, STORE_OPTIONS, &[], |w, name, child| {
        match name {
            "path" => path = w.string_at(child).map(|(s, _)| PathBuf::from(s)),
            "max-file-bytes" => {
                if let Some(v) = w.integer(child, 4096, 1 << 40) {
                    out.max_file_bytes = v;
                }
            }
            "max-files" => {
                if let Some(v) = w.integer(child, 1, 100_000) {
                    out.max_files = v as usize;
                }
            }
            "queue-capacity" => {
                if let Some(v) = w.integer(child, 1, 10_000_000) {
                    out.queue_capacity = v as usize;
                }
            }
            "fsync-interval-ms" => {
                if let Some(v) = w.millis(child, 1, 60_000) {
                    out.fsync_interval = v;
                }
            }
            _ => return false,
        }
        true
    });
    match path {
        Some(p) => {
            out.path = p;
            Some(out)
        }
        None => {
            w.error(
                node,
                "'store' needs a 'path' (a directory for the record files)",
            );
            None
        }
    }
}

const COLLECTOR_OPTIONS: &[&str] = &[
    "url",
    "batch-size",
    "flush-interval-ms",
    "timeout-ms",
    "backoff-min-ms",
    "backoff-max-ms",
    "header",
];

fn collector(w: &mut Walker<'_>, node: &KdlNode) -> Option<CollectorConfig> {
    let mut url = None;
    let mut url_given = false;
    let mut tls = Some(super::AgentTls::default());
    let mut out = CollectorConfig {
        url: String::new(),
        batch_size: 500,
        flush_interval: std::time::Duration::from_millis(1000),
        timeout: std::time::Duration::from_millis(5000),
        backoff_min: std::time::Duration::from_millis(200),
        backoff_max: std::time::Duration::from_secs(30),
        headers: Vec::new(),
        tls: super::AgentTls::default(),
    };
    w.options(node, COLLECTOR_OPTIONS, &["header"], |w, name, child| {
        match name {
            "url" => {
                url_given = true;
                let entry = child.entries().first();
                let text = entry.and_then(|e| w.entry_string("url", e));
                let at = entry.map_or(child.offset(), |e| e.span().offset());
                if entry.is_none() {
                    w.error(child, "'url' needs an address");
                }
                if let Some(u) = text {
                    match files::http_url(&u) {
                        Some(https) => {
                            if !https && child.children().is_some_and(|c| !c.nodes().is_empty()) {
                                w.at_offset(
                                    at,
                                    format!("collector: TLS options need an https:// url, found '{u}'"),
                                );
                            }
                            url = Some(u);
                        }
                        None => w.at_offset(at, format!("collector url '{u}' is not a valid URL")),
                    }
                }
                tls = agent_tls(w, child);
            }
            "batch-size" => {
                if let Some(v) = w.integer(child, 1, 100_000) {
                    out.batch_size = v as usize;
                }
            }
            "flush-interval-ms" => {
                if let Some(v) = w.millis(child, 1, 600_000) {
                    out.flush_interval = v;
                }
            }
            "timeout-ms" => {
                if let Some(v) = w.millis(child, 1, MAX_TIMEOUT_MS) {
                    out.timeout = v;
                }
            }
            "backoff-min-ms" => {
                if let Some(v) = w.millis(child, 1, 600_000) {
                    out.backoff_min = v;
                }
            }
            "backoff-max-ms" => {
                if let Some(v) = w.millis(child, 1, 3_600_000) {
                    out.backoff_max = v;
                }
            }
            "header" => {
                let values = w.strings(child);
                match values.as_slice() {
                    [(name, at), (value, _)] => {
                        let valid = http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                            && http::HeaderValue::from_str(value).is_ok();
                        if valid {
                            out.headers.push((name.clone(), value.clone()));
                        } else {
                            w.at_offset(*at, format!("collector header '{name}' is not a valid header"));
                        }
                    }
                    _ => w.error(child, "'header' takes a name and a value: header \"authorization\" \"Bearer ...\""),
                }
            }
            _ => return false,
        }
        true
    });
    if out.backoff_min > out.backoff_max {
        w.error(node, "collector 'backoff-min-ms' is above 'backoff-max-ms'");
    }
    match (url, tls) {
        (Some(url), Some(tls)) => {
            out.url = url;
            out.tls = tls;
            Some(out)
        }
        (None, _) => {
            if !url_given {
                w.error(node, "'collector' needs a 'url'");
            }
            None
        }
        _ => None,
    }
}
