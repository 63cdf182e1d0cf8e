//! One record per request: the runtime profile's metadata (docs/profile.md),
//! built as the request goes and finished when its response is done.
//!
//! What a record can hold is fixed when the request starts (its mode:
//! `lite` records leave the body and the files out, so they cost the
//! request nothing but a few header reads); the body is looked at as it
//! streams past ([`Tap`]), never buffered beyond `body-bytes`, and uploads
//! are hashed on the way. Redaction happens here, before the record is
//! handed to the store, the collector or an agent: nothing redacted ever
//! leaves this module.

use std::{
    collections::HashSet,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, header, request::Parts};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::{Map, Value, json};

use crate::{
    config::{MetadataConfig, ProfileMode},
    form::{pairs as form_pairs, percent_decode},
    profile::{
        multipart::{self, MultipartObserver},
        store::{Record, StoreHandle},
    },
};

/// What replaces a redacted value.
pub const REDACTED: &str = "[redacted]";

/// Facts the recorder takes from elsewhere: the client's device and
/// network, and the latest host sample.
pub trait Facts: Send + Sync {
    /// `client` fields beside `ip`: device_type, platform, browser,
    /// browser_version, network_type.
    fn client(&self, ip: IpAddr, user_agent: Option<&str>) -> Map<String, Value>;
    /// The latest `host` object.
    fn host(&self) -> Value;
}

/// Builds records for one configuration generation.
pub struct Recorder {
    agent_id: String,
    agent_name: String,
    body_bytes: usize,
    file_content_bytes: usize,
    redact_headers: HashSet<String>,
    redact_fields: HashSet<String>,
    facts: Arc<dyn Facts>,
    /// Where finished records go; `None` when only log agents get them.
    store: Option<StoreHandle>,
}

impl Recorder {
    pub fn new(cfg: &MetadataConfig, facts: Arc<dyn Facts>, store: Option<StoreHandle>) -> Self {
        let agent_id = cfg.agent_id.clone().unwrap_or_else(host_name);
        Self {
            agent_id,
            agent_name: cfg.agent_name.clone(),
            body_bytes: cfg.body_bytes as usize,
            file_content_bytes: cfg.file_content_bytes as usize,
            redact_headers: cfg
                .redact_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            redact_fields: cfg
                .redact_fields
                .iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
            facts,
            store,
        }
    }

    pub fn store(&self) -> Option<&StoreHandle> {
        self.store.as_ref()
    }

    /// Starts the record of a request in `mode` (never `off`). Only what
    /// the record needs is captured here (cheap clones of the head); the
    /// record itself is made by [`Pending::finish`], on the store's writer
    /// when no agent waits for it.
    pub fn begin(
        self: &Arc<Self>,
        mode: ProfileMode,
        route: Option<&str>,
        parts: &Parts,
        client: IpAddr,
        scheme: &'static str,
        host: Option<&str>,
    ) -> Pending {
        let tap = (mode != ProfileMode::Lite).then(|| {
            let content_type = header_str(&parts.headers, header::CONTENT_TYPE);
            Arc::new(Mutex::new(Tap {
                kept: Vec::new(),
                keep: self.body_bytes,
                seen: 0,
                multipart: content_type.and_then(|ct| {
                    MultipartObserver::new(
                        ct,
                        multipart::Limits {
                            max_content_bytes: self.file_content_bytes,
                            ..multipart::Limits::default()
                        },
                    )
                }),
            }))
        });
        Pending {
            recorder: self.clone(),
            mode,
            route: route.map(str::to_owned),
            created: SystemTime::now(),
            client,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            scheme,
            host: host.map(str::to_owned),
            tap,
        }
    }

    /// The `client` and `request` objects of a record.
    fn request(&self, p: &Pending) -> (Map<String, Value>, Map<String, Value>) {
        let headers = &p.headers;
        let user_agent = header_str(headers, header::USER_AGENT);
        let mut client = Map::new();
        client.insert("ip".into(), Value::String(p.client.to_string()));
        client.extend(self.facts.client(p.client, user_agent));
        let path = p.uri.path();
        let query = p.uri.query();
        let host = p.host.as_deref().unwrap_or("");
        // The URL as the client addressed it: its port stays.
        let authority = p
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| header_str(headers, header::HOST))
            .unwrap_or(host);
        let scheme = p.scheme;
        let url = match query {
            Some(q) => format!("{scheme}://{authority}{path}?{q}"),
            None => format!("{scheme}://{authority}{path}"),
        };
        let mut request = Map::new();
        request.insert("method".into(), Value::String(p.method.to_string()));
        request.insert("url".into(), Value::String(self.redact_url(&url, query)));
        request.insert("scheme".into(), Value::String(scheme.to_owned()));
        request.insert("host".into(), Value::String(host.to_owned()));
        request.insert("endpoint".into(), Value::String(path.to_owned()));
        request.insert("headers".into(), self.headers(headers));
        request.insert(
            "query_parameters".into(),
            Value::Object(self.query(query.unwrap_or(""))),
        );
        (client, request)
    }

    /// The request headers, with the configured ones redacted. The seed's
    /// four are always present (`null` when the request had none);
    /// `referrer` is the `Referer` header.
    fn headers(&self, headers: &HeaderMap) -> Value {
        let mut out = Map::new();
        for key in ["user-agent", "content-type", "content-length", "referrer"] {
            out.insert(key.into(), Value::Null);
        }
        for (name, value) in headers {
            let key = match name.as_str() {
                "referer" => "referrer",
                other => other,
            };
            let text = if self.redact_headers.contains(name.as_str()) {
                REDACTED.to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            match out.get_mut(key) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(&text);
                }
                _ => {
                    out.insert(key.to_owned(), Value::String(text));
                }
            }
        }
        Value::Object(out)
    }

    fn redacts(&self, field: &str) -> bool {
        self.redact_fields.contains(&field.to_ascii_lowercase())
    }

    /// Query parameters, decoded; a name given twice keeps every value in
    /// an array.
    fn query(&self, query: &str) -> Map<String, Value> {
        let mut out = Map::new();
        for (name, value) in form_pairs(query) {
            let value = if self.redacts(&name) {
                REDACTED.to_owned()
            } else {
                value
            };
            match out.get_mut(&name) {
                Some(Value::Array(values)) => values.push(Value::String(value)),
                Some(existing) => {
                    let first = existing.take();
                    *existing = Value::Array(vec![first, Value::String(value)]);
                }
                None => {
                    out.insert(name, Value::String(value));
                }
            }
        }
        out
    }

    /// The URL with redacted query values.
    fn redact_url(&self, url: &str, query: Option<&str>) -> String {
        let Some(query) = query else {
            return url.to_owned();
        };
        if !form_pairs(query).any(|(name, _)| self.redacts(&name)) {
            return url.to_owned();
        }
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| {
                let name = pair.split_once('=').map_or(pair, |(n, _)| n);
                if self.redacts(&percent_decode(name)) {
                    format!("{name}={REDACTED}")
                } else {
                    pair.to_owned()
                }
            })
            .collect();
        let base = url.split_once('?').map_or(url, |(b, _)| b);
        format!("{base}?{}", redacted.join("&"))
    }

    /// The kept body as text, redacted: JSON keys and form fields by name.
    /// A body that cannot be parsed but names a redacted field is left out
    /// rather than risk leaking it.
    fn body(&self, kept: &[u8], truncated: bool, content_type: Option<&str>) -> Value {
        if kept.is_empty() {
            return Value::Null;
        }
        let text = String::from_utf8_lossy(kept).into_owned();
        let media = content_type
            .map(crate::inspect::media_type)
            .unwrap_or_default();
        if media == "application/json" || media.ends_with("+json") {
            if !truncated && let Ok(mut json) = serde_json::from_str::<Value>(&text) {
                self.redact_json(&mut json);
                return Value::String(json.to_string());
            }
        } else if media == "application/x-www-form-urlencoded" {
            let pairs: Vec<String> = text
                .split('&')
                .map(|pair| {
                    let name = pair.split_once('=').map_or(pair, |(n, _)| n);
                    if self.redacts(&percent_decode(name)) {
                        format!("{name}={REDACTED}")
                    } else {
                        pair.to_owned()
                    }
                })
                .collect();
            return Value::String(pairs.join("&"));
        }
        let lower = text.to_ascii_lowercase();
        if self
            .redact_fields
            .iter()
            .any(|f| lower.contains(f.as_str()))
        {
            return Value::String(REDACTED.to_owned());
        }
        Value::String(text)
    }

    fn redact_json(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    if self.redacts(key) {
                        *v = Value::String(REDACTED.to_owned());
                    } else {
                        self.redact_json(v);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            _ => {}
        }
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sentinel".to_owned())
}

/// What the request body showed as it streamed past.
pub struct Tap {
    kept: Vec<u8>,
    keep: usize,
    seen: u64,
    multipart: Option<MultipartObserver>,
}

impl Tap {
    fn feed(&mut self, data: &[u8]) {
        self.seen += data.len() as u64;
        let room = self.keep.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..room.min(data.len())]);
        if let Some(m) = &mut self.multipart {
            m.feed(data);
        }
    }
}

/// A record begun, waiting for its response: the request's head as it
/// arrived, and the tap its body feeds.
pub struct Pending {
    recorder: Arc<Recorder>,
    mode: ProfileMode,
    route: Option<String>,
    created: SystemTime,
    client: IpAddr,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    scheme: &'static str,
    host: Option<String>,
    tap: Option<Arc<Mutex<Tap>>>,
}

/// How the request ended, for its record.
pub struct Ending {
    pub status: u16,
    pub duration: Duration,
    pub response_bytes: u64,
    pub decisions: Value,
    pub error: Option<String>,
}

impl Pending {
    /// Wraps the request body so that its bytes feed the record as they
    /// pass; `lite` records do not look at bodies.
    pub fn tap<B>(&self, body: B) -> TapBody<B> {
        TapBody {
            inner: body,
            tap: self.tap.clone(),
        }
    }

    /// The finished record, redacted.
    pub fn finish(self, ending: Ending) -> Value {
        let (client, mut request) = self.recorder.request(&self);
        let content_type = header_str(&self.headers, header::CONTENT_TYPE);
        if let Some(tap) = &self.tap {
            let mut tap = tap.lock().unwrap_or_else(|p| p.into_inner());
            let truncated = tap.seen > tap.kept.len() as u64;
            let body = self.recorder.body(&tap.kept, truncated, content_type);
            request.insert("body".into(), body);
            request.insert("body_size".into(), json!(tap.seen));
            request.insert("body_truncated".into(), json!(truncated));
            let files = tap.multipart.take().map(|m| m.finish()).unwrap_or_default();
            request.insert(
                "files".into(),
                serde_json::to_value(files).unwrap_or(Value::Array(Vec::new())),
            );
        }
        let mut record = Map::new();
        record.insert("agent_id".into(), json!(self.recorder.agent_id));
        record.insert("agent_name".into(), json!(self.recorder.agent_name));
        record.insert("mode".into(), json!(self.mode.as_str()));
        record.insert("route".into(), json!(self.route));
        record.insert("client".into(), Value::Object(client));
        record.insert("request".into(), Value::Object(request));
        record.insert(
            "response".into(),
            json!({
                "status": ending.status,
                "duration_ms": ending.duration.as_secs_f64() * 1000.0,
                "body_size": ending.response_bytes,
                "error": ending.error,
            }),
        );
        record.insert("decisions".into(), ending.decisions);
        record.insert("host".into(), self.recorder.facts.host());
        let created = humantime::format_rfc3339_millis(self.created).to_string();
        record.insert("request_created_at".into(), json!(created));
        Value::Object(record)
    }

    /// Finishes the record and hands it to the store. With `wanted` (a log
    /// agent gets it) the record is made here and returned; otherwise the
    /// store's writer makes it, and the request's task only queues what it
    /// captured. A full queue drops the record and counts it: the request
    /// never waits for the store.
    pub fn store(self, ending: Ending, wanted: bool) -> Option<Value> {
        let store = self.recorder.store.clone();
        if wanted {
            let record = self.finish(ending);
            if let Some(store) = store {
                store.push(record.clone());
            }
            return Some(record);
        }
        if let Some(store) = store {
            store.push(Record::Deferred(Box::new(move || self.finish(ending))));
        }
        None
    }
}

pin_project! {
    /// A request body whose bytes feed a record's [`Tap`].
    pub struct TapBody<B> {
        #[pin]
        inner: B,
        tap: Option<Arc<Mutex<Tap>>>,
    }
}

impl<B: Body<Data = Bytes>> Body for TapBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(tap)) = (&polled, this.tap.as_ref())
            && let Some(data) = frame.data_ref()
        {
            tap.lock().unwrap_or_else(|p| p.into_inner()).feed(data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoFacts;

    impl Facts for NoFacts {
        fn client(&self, _: IpAddr, _: Option<&str>) -> Map<String, Value> {
            Map::new()
        }
        fn host(&self) -> Value {
            json!({"pid": 1})
        }
    }

    fn recorder() -> Arc<Recorder> {
        Arc::new(Recorder::new(
            &MetadataConfig::default(),
            Arc::new(NoFacts),
            None,
        ))
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method("POST").uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn redaction_before_anything_leaves() {
        let r = recorder();
        let p = parts(
            "/login?user=al&token=abc&x=1&x=2",
            &[
                ("authorization", "Bearer s3cret"),
                ("cookie", "sid=1"),
                ("referer", "https://example.test/"),
                ("content-type", "application/json"),
            ],
        );
        let pending = r.begin(
            ProfileMode::Protection,
            Some("app"),
            &p,
            "203.0.113.1".parse().unwrap(),
            "https",
            Some("example.test"),
        );
        pending
            .tap
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .feed(br#"{"user": "al", "password": "hunter2", "nested": {"api_key": "k"}}"#);
        let record = pending.finish(Ending {
            status: 200,
            duration: Duration::from_millis(3),
            response_bytes: 10,
            decisions: json!([]),
            error: None,
        });
        let text = record.to_string();
        for secret in ["s3cret", "sid=1", "hunter2", "\"k\"", "token=abc"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        let req = &record["request"];
        assert_eq!(req["headers"]["authorization"], REDACTED);
        assert_eq!(req["headers"]["referrer"], "https://example.test/");
        assert_eq!(req["headers"]["user-agent"], Value::Null);
        assert_eq!(req["query_parameters"]["token"], REDACTED);
        assert_eq!(req["query_parameters"]["x"], json!(["1", "2"]));
        assert_eq!(
            req["url"],
            format!("https://example.test/login?user=al&token={REDACTED}&x=1&x=2")
        );
        assert_eq!(req["endpoint"], "/login");
        assert_eq!(record["host"]["pid"], 1);
        assert_eq!(record["mode"], "protection");
    }

    #[test]
    fn lite_records_leave_bodies_out_and_long_bodies_are_cut() {
        let r = recorder();
        let p = parts("/", &[("content-type", "text/plain")]);
        let lite = r.begin(
            ProfileMode::Lite,
            None,
            &p,
            "::1".parse().unwrap(),
            "http",
            None,
        );
        assert!(lite.tap.is_none());
        let record = lite.finish(Ending {
            status: 404,
            duration: Duration::ZERO,
            response_bytes: 0,
            decisions: json!([]),
            error: None,
        });
        assert!(record["request"].get("body").is_none());

        let full = r.begin(
            ProfileMode::Monitor,
            None,
            &p,
            "::1".parse().unwrap(),
            "http",
            None,
        );
        full.tap
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .feed(&vec![b'a'; 5000]);
        let record = full.finish(Ending {
            status: 200,
            duration: Duration::ZERO,
            response_bytes: 0,
            decisions: json!([]),
            error: None,
        });
        assert_eq!(record["request"]["body"].as_str().unwrap().len(), 2048);
        assert_eq!(record["request"]["body_size"], 5000);
        assert_eq!(record["request"]["body_truncated"], true);
    }

    #[test]
    fn an_unparsable_body_naming_a_secret_is_left_out() {
        let r = recorder();
        let text = r.body(br#"{"password": "hunt"#, true, Some("application/json"));
        assert_eq!(text, Value::String(REDACTED.to_owned()));
        let form = r.body(
            b"user=al&password=x",
            false,
            Some("application/x-www-form-urlencoded"),
        );
        assert_eq!(form, Value::String(format!("user=al&password={REDACTED}")));
    }
}
