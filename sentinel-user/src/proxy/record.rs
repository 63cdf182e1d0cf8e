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
    borrow::Cow,
    collections::HashSet,
    io::Write as _,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, header, request::Parts};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::{Map, Value};

use crate::{
    config::{MetadataConfig, ProfileMode},
    form::{pairs as form_pairs, percent_decode},
    profile::{
        json::JsonObject,
        multipart::{self, MultipartObserver},
        store::{MakeRecord, StoreHandle},
    },
    proxy::router::host_of,
};

/// What replaces a redacted value.
pub const REDACTED: &str = "[redacted]";

/// Facts the recorder takes from elsewhere: the client's device and
/// network, and the latest host sample, each written as JSON straight
/// into the record.
pub trait Facts: Send + Sync {
    /// The `client` members beside `ip`: device_type, platform, browser,
    /// browser_version, network_type.
    fn client(&self, ip: IpAddr, user_agent: Option<&str>, client: &mut JsonObject<'_>);
    /// Writes the latest `host` object.
    fn host(&self, out: &mut Vec<u8>);
}

/// Builds records for one configuration generation.
pub struct Recorder {
    agent_id: String,
    agent_name: String,
    body_bytes: usize,
    file_content_bytes: usize,
    /// Lowercase; a handful, so a scan beats hashing each header's name.
    redact_headers: Vec<Box<str>>,
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
            redact_headers: {
                let mut names: Vec<Box<str>> = cfg
                    .redact_headers
                    .iter()
                    .map(|h| h.to_ascii_lowercase().into())
                    .collect();
                names.sort();
                names.dedup();
                names
            },
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

    /// Starts the record of a request in `mode` (never `off`): everything
    /// the request's head gives is written here, redacted, into a buffer
    /// the record is finished in (no copy of the head is kept, and no
    /// allocation once the thread's buffers exist); the body's members,
    /// when the mode taps it, and the response's are added by
    /// [`Pending::store`].
    pub fn begin(
        self: &Arc<Self>,
        mode: ProfileMode,
        route: Option<&str>,
        parts: &Parts,
        client: IpAddr,
        scheme: &'static str,
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
                content_type: content_type.map(str::to_owned),
            }))
        });
        let created = SystemTime::now();
        let mut json = buffer();
        if tap.is_none() {
            capture(&mut json, mode, route, parts, client, scheme, created);
            return Pending {
                recorder: self.clone(),
                json,
                created,
                tap,
                captured: true,
            };
        }
        self.open(
            &mut json,
            mode.as_str(),
            route,
            &Head::of(parts),
            client,
            scheme,
        );
        Pending {
            recorder: self.clone(),
            json,
            created,
            tap,
            captured: false,
        }
    }

    /// Writes a record's members up to the `request` object, left open.
    fn open(
        &self,
        json: &mut Vec<u8>,
        mode: &str,
        route: Option<&str>,
        head: &Head<'_>,
        client: IpAddr,
        scheme: &str,
    ) {
        let mut record = JsonObject::open(json);
        record.str("agent_id", &self.agent_id);
        record.str("agent_name", &self.agent_name);
        record.str("mode", mode);
        record.opt_str("route", route);
        self.request(head, client, scheme, &mut record);
    }

    /// Makes a lite record from what [`capture`] and [`Pending::store`]
    /// put in `data`, on the store's writer: the head is read where the
    /// capture holds it, with no header map built again.
    fn make(&self, data: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let mut r = Reader { data, at: 0 };
        let mode = r.str()?;
        let route = r.opt_str()?;
        let scheme = r.str()?;
        let client = r.ip()?;
        let created = SystemTime::UNIX_EPOCH + Duration::from_nanos(r.u64()?);
        let method = r.str()?;
        let authority = r.opt_str()?;
        let path = r.str()?;
        let query = r.opt_str()?;
        let headers = r.headers()?;
        let head = Head {
            method,
            authority,
            path,
            query,
            headers,
        };
        self.open(out, mode, route, &head, client, scheme);
        let status = r.u64()? as u16;
        let duration = Duration::from_nanos(r.u64()?);
        let response_bytes = r.u64()?;
        let decisions = r.bytes()?;
        let error = r.opt_str()?;
        self.close(
            out,
            None,
            Closing {
                status,
                duration,
                response_bytes,
                decisions: Decisions::Json(decisions),
                error,
            },
            created,
        );
        Some(())
    }

    /// Writes the body's members (with `tap`), closes the `request` object
    /// and writes the rest of the record.
    fn close(
        &self,
        out: &mut Vec<u8>,
        tap: Option<&Mutex<Tap>>,
        ending: Closing<'_>,
        created: SystemTime,
    ) {
        let mut request = JsonObject::resume(out);
        if let Some(tap) = tap {
            let mut tap = tap.lock().unwrap_or_else(|p| p.into_inner());
            let truncated = tap.seen > tap.kept.len() as u64;
            let body = self.body(&tap.kept, truncated, tap.content_type.as_deref());
            request.value("body", &body);
            request.value("body_size", &tap.seen);
            request.value("body_truncated", &truncated);
            let files = tap.multipart.take().map(|m| m.finish()).unwrap_or_default();
            request.value("files", &files);
        }
        request.close();
        let mut record = JsonObject::resume(out);
        let mut response = record.object("response");
        response.value("status", &ending.status);
        response.value("duration_ms", &(ending.duration.as_secs_f64() * 1000.0));
        response.value("body_size", &ending.response_bytes);
        response.opt_str("error", ending.error);
        response.close();
        match ending.decisions {
            Decisions::Value(v) => record.value("decisions", v),
            Decisions::Json(json) => record.raw("decisions", json),
        }
        self.facts.host(record.key("host"));
        timestamp(record.key("request_created_at"), created);
        record.close();
    }

    /// Writes the `client` member of a record and the `request` one, left
    /// open for the body's members.
    fn request(&self, head: &Head<'_>, ip: IpAddr, scheme: &str, record: &mut JsonObject<'_>) {
        let headers = &head.headers;
        let known = headers.known();
        // Worked out here, not on the request's task, for a lite record.
        let host = host_of(head.authority, known.host.peek());
        let user_agent = first_str(&known.user_agent);
        let mut client = record.object("client");
        address(client.key("ip"), ip);
        self.facts.client(ip, user_agent, &mut client);
        client.close();

        let (path, query) = (head.path, head.query);
        let host = host.as_deref().unwrap_or("");
        // The URL as the client addressed it: its port stays.
        let authority = head
            .authority
            .or_else(|| first_str(&known.host))
            .unwrap_or(host);
        let mut url = String::with_capacity(
            scheme.len() + 3 + authority.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        for part in [scheme, "://", authority, path] {
            url.push_str(part);
        }
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        let mut request = record.object("request");
        request.str("method", head.method);
        request.str("url", &self.redact_url(&url, query));
        request.str("scheme", scheme);
        request.str("host", host);
        request.str("endpoint", path);
        let mut out = request.object("headers");
        self.headers(headers, known, &mut out);
        out.close();
        match query {
            Some(query) if !query.is_empty() => {
                request.value("query_parameters", &self.query(query))
            }
            _ => request.raw("query_parameters", b"{}"),
        }
        // Left open: the body's members, if any, come when it has passed.
    }

    /// The request headers, with the configured ones redacted. The seed's
    /// four are always present (`null` when the request had none);
    /// `referrer` is the `Referer` header. A header given several times is
    /// one string, its values joined by `, `.
    fn headers<'h>(&self, headers: &Headers<'h>, known: Known<'h>, out: &mut JsonObject<'_>) {
        self.header(out, "user-agent", known.user_agent);
        self.header(out, "content-type", known.content_type);
        self.header(out, "content-length", known.content_length);
        self.header(out, "referrer", known.referer.chain(known.referrer));
        for (name, values) in headers.groups() {
            if Known::NAMES.contains(&name) && name != "host" {
                continue;
            }
            self.header(out, name, values);
        }
    }

    /// One header's values under `key`: `null` when there are none,
    /// [`REDACTED`] when its name is redacted.
    fn header<'h>(
        &self,
        out: &mut JsonObject<'_>,
        key: &str,
        mut values: impl Iterator<Item = &'h [u8]>,
    ) {
        let Some(first) = values.next() else {
            out.opt_str(key, None);
            return;
        };
        let redacted = |name: &str| self.redact_headers.iter().any(|r| **r == *name);
        if redacted(key) || (key == "referrer" && redacted("referer")) {
            out.str(key, REDACTED);
            return;
        }
        let first = lossy(first);
        match values.next() {
            None => out.str(key, &first),
            Some(second) => {
                let mut joined = first.into_owned();
                for value in std::iter::once(second).chain(values) {
                    joined.push_str(", ");
                    joined.push_str(&lossy(value));
                }
                out.str(key, &joined);
            }
        }
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
    fn redact_url<'u>(&self, url: &'u str, query: Option<&str>) -> Cow<'u, str> {
        let Some(query) = query else {
            return Cow::Borrowed(url);
        };
        if self.redact_fields.is_empty() || !form_pairs(query).any(|(name, _)| self.redacts(&name))
        {
            return Cow::Borrowed(url);
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
        Cow::Owned(format!("{base}?{}", redacted.join("&")))
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

/// A header value as text, invalid UTF-8 replaced: `String::from_utf8_lossy`
/// with the valid case (nearly every value) checked the quick way first.
fn lossy(value: &[u8]) -> Cow<'_, str> {
    match text(value) {
        Some(text) => Cow::Borrowed(text),
        None => String::from_utf8_lossy(value),
    }
}

/// `bytes` as text when they are UTF-8. Captured strings are nearly all
/// ASCII, which `is_ascii` checks a word at a time wherever the string
/// starts; `from_utf8` checks words only from an aligned start, and went
/// byte by byte over most of these short strings (about 3,000
/// instructions a record, callgrind).
fn text(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        return Some(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).ok()
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `ip` as a JSON string (an address needs no escaping).
fn address(out: &mut Vec<u8>, ip: IpAddr) {
    let mut text = super::forward::IpText::new();
    text.write(ip);
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// `created` as a JSON string, RFC 3339 in UTC with milliseconds.
fn timestamp(out: &mut Vec<u8>, created: SystemTime) {
    out.push(b'"');
    rfc3339_millis(out, created);
    out.push(b'"');
}

/// `created` in RFC 3339, UTC, with milliseconds (`humantime`'s
/// `format_rfc3339_millis`).
pub(crate) fn rfc3339_millis(out: &mut Vec<u8>, created: SystemTime) {
    match rfc3339_millis_text(created) {
        Some(text) => out.extend_from_slice(&text),
        None => {
            let _ = write!(out, "{}", humantime::format_rfc3339_millis(created));
        }
    }
}

/// [`rfc3339_millis`] into a `String`.
pub(crate) fn rfc3339_millis_string(out: &mut String, created: SystemTime) {
    match rfc3339_millis_text(created) {
        // ASCII digits and punctuation.
        Some(text) => out.push_str(std::str::from_utf8(&text).unwrap_or_default()),
        None => {
            use std::fmt::Write as _;
            let _ = write!(out, "{}", humantime::format_rfc3339_millis(created));
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, the date and time to the second formatted
/// once per second per thread; `None` past the year 9999, left to
/// humantime.
fn rfc3339_millis_text(created: SystemTime) -> Option<[u8; 24]> {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let since = created
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut head) = SECOND.get();
    if cached != secs {
        let full = humantime::format_rfc3339_seconds(created).to_string();
        // `YYYY-MM-DDTHH:MM:SSZ`.
        if full.len() != 20 {
            return None;
        }
        head.copy_from_slice(full.as_bytes().get(..19)?);
        SECOND.set((secs, head));
    }
    let millis = since.subsec_millis();
    let mut text = [0; 24];
    text[..19].copy_from_slice(&head);
    text[19..].copy_from_slice(&[
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ]);
    Some(text)
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
    /// The request's, for the body's redaction.
    content_type: Option<String>,
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

/// A record begun, waiting for its response: the members its request's
/// head gave, and the tap its body feeds.
pub struct Pending {
    recorder: Arc<Recorder>,
    /// The record's JSON so far, its `request` object open.
    json: Vec<u8>,
    created: SystemTime,
    tap: Option<Arc<Mutex<Tap>>>,
    /// `json` holds a lite capture (see [`capture`]), not JSON yet.
    captured: bool,
}

/// How the request ended, as [`Recorder::close`] writes it: from an
/// [`Ending`], or from a capture (decisions already serialized).
struct Closing<'a> {
    status: u16,
    duration: Duration,
    response_bytes: u64,
    decisions: Decisions<'a>,
    error: Option<&'a str>,
}

enum Decisions<'a> {
    Value(&'a Value),
    Json(&'a [u8]),
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

    /// Finishes the record, redacted, as one JSON object in `self.json`
    /// (a lite capture is made into one here).
    fn complete(&mut self, ending: Ending) {
        let recorder = self.recorder.clone();
        if self.captured {
            self.captured = false;
            let data = std::mem::replace(&mut self.json, buffer());
            if recorder.make(&data, &mut self.json).is_none() {
                self.json.clear();
            }
            give_back(data);
            // The capture has no ending: it is the one given now.
            let _ = ending;
            return;
        }
        let created = self.created;
        let closing = Closing {
            status: ending.status,
            duration: ending.duration,
            response_bytes: ending.response_bytes,
            decisions: Decisions::Value(&ending.decisions),
            error: ending.error.as_deref(),
        };
        recorder.close(&mut self.json, self.tap.as_deref(), closing, created);
    }

    /// The finished record, redacted, as a JSON value.
    pub fn finish(mut self, ending: Ending) -> Value {
        if self.captured {
            end_capture(&mut self.json, &ending);
        }
        self.complete(ending);
        // What `complete` makes is JSON by construction.
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }

    /// Finishes the record and hands it to the store. A lite record is
    /// made by the store's writer from what was captured (a copy of the
    /// head's bytes in a reused buffer, no allocation on the request's
    /// task); with `wanted` (a log agent gets it) the record is made here
    /// and also returned as a value. A full queue drops the record and
    /// counts it: the request never waits for the store.
    pub fn store(mut self, ending: Ending, wanted: bool) -> Option<Value> {
        if self.captured {
            end_capture(&mut self.json, &ending);
            if !wanted {
                if let Some(store) = self.recorder.store() {
                    store.push_deferred(&self.json, &self.recorder);
                }
                return None;
            }
        }
        self.complete(ending);
        if let Some(store) = self.recorder.store() {
            store.push_object(&self.json);
        }
        // What `complete` makes is JSON by construction.
        wanted.then(|| serde_json::from_slice(&self.json).unwrap_or(Value::Null))
    }
}

impl MakeRecord for Recorder {
    fn make(&self, data: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        if Recorder::make(self, data, out).is_none() {
            out.truncate(start);
        }
    }
}

/// The request's head as a record reads it.
struct Head<'a> {
    method: &'a str,
    authority: Option<&'a str>,
    path: &'a str,
    query: Option<&'a str>,
    headers: Headers<'a>,
}

impl<'a> Head<'a> {
    fn of(parts: &'a Parts) -> Self {
        Self {
            method: parts.method.as_str(),
            authority: parts.uri.authority().map(|a| a.as_str()),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: Headers::Map(&parts.headers),
        }
    }
}

/// A request's headers: its own map, or the groups a [`capture`] copied
/// (each name once, lowercase as the map had it, with its values in
/// order), read where they lie.
#[derive(Clone, Copy)]
enum Headers<'a> {
    Map(&'a HeaderMap),
    Captured { groups: usize, data: &'a [u8] },
}

impl<'a> Headers<'a> {
    /// The values of the headers a record names, found in one pass.
    fn known(&self) -> Known<'a> {
        let mut known = Known {
            user_agent: Values::None,
            content_type: Values::None,
            content_length: Values::None,
            referer: Values::None,
            referrer: Values::None,
            host: Values::None,
        };
        match *self {
            Headers::Map(map) => {
                for name in Known::NAMES {
                    *known.slot(name) = Values::of(map, name);
                }
            }
            Headers::Captured { .. } => {
                for (name, values) in self.groups() {
                    if Known::NAMES.contains(&name) {
                        *known.slot(name) = values;
                    }
                }
            }
        }
        known
    }

    /// Each name once, in the order the map keeps them, with its values.
    fn groups(&self) -> impl Iterator<Item = (&'a str, Values<'a>)> + 'a {
        let (map, captured) = match *self {
            Headers::Map(map) => (Some(map), None),
            Headers::Captured { groups, data } => (None, Some((groups, Reader { data, at: 0 }))),
        };
        let from_map = map.into_iter().flat_map(|map| {
            map.keys()
                .map(move |name| (name.as_str(), Values::of(map, name.as_str())))
        });
        let from_capture = captured.into_iter().flat_map(|(groups, mut r)| {
            // A capture is this process's own: a short one ends the list.
            std::iter::from_fn(move || {
                let name = r.str()?;
                let count = r.u32()? as usize;
                let values = Values::Captured {
                    count,
                    r: Reader {
                        data: r.data,
                        at: r.at,
                    },
                };
                for _ in 0..count {
                    r.bytes()?;
                }
                Some((name, values))
            })
            .take(groups)
        });
        from_map.chain(from_capture)
    }
}

/// The headers a record names, each name's values.
struct Known<'a> {
    user_agent: Values<'a>,
    content_type: Values<'a>,
    content_length: Values<'a>,
    referer: Values<'a>,
    /// Not a standard name, but seen: it joins `referer` under `referrer`.
    referrer: Values<'a>,
    host: Values<'a>,
}

impl<'a> Known<'a> {
    const NAMES: [&'static str; 6] = [
        "user-agent",
        "content-type",
        "content-length",
        "referer",
        "referrer",
        "host",
    ];

    fn slot(&mut self, name: &str) -> &mut Values<'a> {
        match name {
            "user-agent" => &mut self.user_agent,
            "content-type" => &mut self.content_type,
            "content-length" => &mut self.content_length,
            "referer" => &mut self.referer,
            "referrer" => &mut self.referrer,
            _ => &mut self.host,
        }
    }
}

/// The first of `values`, when it is text.
fn first_str<'a>(values: &Values<'a>) -> Option<&'a str> {
    values.peek().and_then(|v| text(v))
}

/// The values of one header name.
enum Values<'a> {
    None,
    Map {
        first: Option<&'a http::HeaderValue>,
        rest: http::header::ValueIter<'a, http::HeaderValue>,
    },
    Captured {
        count: usize,
        r: Reader<'a>,
    },
}

impl<'a> Values<'a> {
    fn of(map: &'a HeaderMap, name: &str) -> Self {
        let mut rest = map.get_all(name).iter();
        Values::Map {
            first: rest.next(),
            rest,
        }
    }

    /// The first value, left in place.
    fn peek(&self) -> Option<&'a [u8]> {
        match self {
            Values::None => None,
            Values::Map { first, .. } => first.map(|v| v.as_bytes()),
            Values::Captured { count, r } => (*count > 0).then(|| r.clone().bytes()).flatten(),
        }
    }
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::None => None,
            Values::Map { first, rest } => {
                first.take().or_else(|| rest.next()).map(|v| v.as_bytes())
            }
            Values::Captured { count, r } => {
                *count = count.checked_sub(1)?;
                r.bytes()
            }
        }
    }
}

/// Copies what a lite record needs of the request into `out`, to be made
/// into the record off the request's task: length-prefixed strings, in the
/// order [`Recorder::make`] reads them.
#[allow(clippy::too_many_arguments)]
fn capture(
    out: &mut Vec<u8>,
    mode: ProfileMode,
    route: Option<&str>,
    parts: &Parts,
    client: IpAddr,
    scheme: &str,
    created: SystemTime,
) {
    put(out, mode.as_str().as_bytes());
    put_opt(out, route);
    put(out, scheme.as_bytes());
    match client {
        IpAddr::V4(ip) => put(out, &ip.octets()),
        IpAddr::V6(ip) => put(out, &ip.octets()),
    }
    let nanos = created
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    out.extend_from_slice(&nanos.to_le_bytes());
    put(out, parts.method.as_str().as_bytes());
    put_opt(out, parts.uri.authority().map(|a| a.as_str()));
    put(out, parts.uri.path().as_bytes());
    put_opt(out, parts.uri.query());
    let headers = &parts.headers;
    out.extend_from_slice(&(headers.keys_len() as u32).to_le_bytes());
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    // The map iterates name by name, each name's values together, so the
    // groups are runs of one name: no lookup per name on the request's
    // task.
    let mut group: Option<(&HeaderName, usize, u32)> = None;
    for (name, value) in headers {
        match &mut group {
            Some((current, _, n)) if *current == name => *n += 1,
            _ => {
                if let Some((_, count, n)) = group {
                    out[count..count + 4].copy_from_slice(&n.to_le_bytes());
                }
                put(out, name.as_str().as_bytes());
                group = Some((name, out.len(), 1));
                out.extend_from_slice(&[0; 4]);
            }
        }
        put(out, value.as_bytes());
    }
    if let Some((_, count, n)) = group {
        out[count..count + 4].copy_from_slice(&n.to_le_bytes());
    }
    // The groups' length, so that the reader can step over them at once.
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Adds how the request ended to a capture.
fn end_capture(out: &mut Vec<u8>, ending: &Ending) {
    out.extend_from_slice(&u64::from(ending.status).to_le_bytes());
    out.extend_from_slice(&(ending.duration.as_nanos() as u64).to_le_bytes());
    out.extend_from_slice(&ending.response_bytes.to_le_bytes());
    let at = out.len();
    put(out, &[0; 0]);
    let _ = serde_json::to_writer(&mut *out, &ending.decisions);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    put_opt(out, ending.error.as_deref());
}

/// Marks an absent string.
const NONE: u32 = u32::MAX;

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_opt(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => put(out, value.as_bytes()),
        None => out.extend_from_slice(&NONE.to_le_bytes()),
    }
}

/// Reads a capture back.
#[derive(Clone)]
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.take(n as usize)
    }

    fn str(&mut self) -> Option<&'a str> {
        text(self.bytes()?)
    }

    fn ip(&mut self) -> Option<IpAddr> {
        let bytes = self.bytes()?;
        if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
            return Some(IpAddr::from(v4));
        }
        <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
    }

    /// The header groups of a capture, stepped over.
    fn headers(&mut self) -> Option<Headers<'a>> {
        let groups = self.u32()? as usize;
        let data = self.bytes()?;
        Some(Headers::Captured { groups, data })
    }

    fn opt_str(&mut self) -> Option<Option<&'a str>> {
        let at = self.at;
        if self.u32()? == NONE {
            return Some(None);
        }
        self.at = at;
        self.str().map(Some)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.json));
    }
}

/// What a record usually takes, serialized.
const RECORD_BYTES: usize = 2048;
/// Record buffers kept for the next records, per thread.
const KEPT_BUFFERS: usize = 256;

thread_local! {
    /// Buffers of finished records and captures, for the next ones on this
    /// thread: a record then costs no allocation, and no lock or memory is
    /// shared per record with another thread (the store copies what it
    /// queues).
    static BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn buffer() -> Vec<u8> {
    BUFFERS
        .try_with(|b| b.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(RECORD_BYTES))
}

fn give_back(mut buffer: Vec<u8>) {
    // A record with a large body would keep its buffer's size.
    if buffer.capacity() == 0 || buffer.capacity() > 4 * RECORD_BYTES {
        return;
    }
    buffer.clear();
    // During the thread's exit the buffer is freed instead.
    let _ = BUFFERS.try_with(|b| {
        let mut kept = b.borrow_mut();
        if kept.len() < KEPT_BUFFERS {
            kept.push(buffer);
        }
    });
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
    use serde_json::json;

    struct NoFacts;

    impl Facts for NoFacts {
        fn client(&self, _: IpAddr, _: Option<&str>, _: &mut JsonObject<'_>) {}
        fn host(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(br#"{"pid":1}"#);
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
    fn captured_bytes_are_text_when_they_are_utf8() {
        for valid in ["", "GET", "/a?b=c d", "Mozilla/5.0 (X11)", "naïve ☃ /ü"] {
            assert_eq!(text(valid.as_bytes()), Some(valid));
            assert_eq!(lossy(valid.as_bytes()), valid);
        }
        for invalid in [&b"\xff"[..], b"abc\xc3", b"\xed\xa0\x80 surrogate"] {
            assert_eq!(text(invalid), None);
            assert_eq!(lossy(invalid), String::from_utf8_lossy(invalid));
        }
    }

    #[test]
    fn redaction_before_anything_leaves() {
        let r = recorder();
        let p = parts(
            "/login?user=al&token=abc&x=1&x=2",
            &[
                ("host", "example.test"),
                ("authorization", "Bearer s3cret"),
                ("cookie", "sid=1"),
                ("referer", "https://example.test/"),
                ("content-type", "application/json"),
                ("x-multi", "a"),
                ("x-multi", "b"),
            ],
        );
        let pending = r.begin(
            ProfileMode::Protection,
            Some("app"),
            &p,
            "203.0.113.1".parse().unwrap(),
            "https",
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
        assert_eq!(req["headers"]["x-multi"], "a, b");
        assert_eq!(req["headers"]["content-type"], "application/json");
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
        let lite = r.begin(ProfileMode::Lite, None, &p, "::1".parse().unwrap(), "http");
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
    fn a_lite_record_made_from_its_capture_is_the_record_of_its_head() {
        let r = recorder();
        // The host from the URI's authority, then from the `Host` header.
        let absolute = parts(
            "http://example.test:8080/a%20b/c?q=1&q=2&empty=",
            &[
                ("host", "other.test"),
                ("user-agent", "curl/8.0"),
                ("authorization", "Bearer s3cret"),
                ("x-multi", "a"),
                ("referrer", "https://two.test/"),
                ("accept", "*/*"),
                ("x-multi", "b \"quoted\""),
                ("referer", "https://one.test/"),
                ("x-multi", "c"),
                ("x-bytes", "caf\u{e9}"),
            ],
        );
        let origin_form = parts(
            "/path?x=1",
            &[("host", "Example.TEST:81"), ("host", "second.test")],
        );
        let decided = json!([{"agent": "waf", "decision": "block"}]);
        for (p, client, decisions) in [
            (&absolute, "203.0.113.9", &decided),
            (&absolute, "2001:db8::1", &decided),
            (&origin_form, "203.0.113.9", &decided),
            // No agent decided anything, as in nearly every record.
            (&absolute, "203.0.113.9", &json!([])),
        ] {
            let ending = || Ending {
                status: 503,
                duration: Duration::from_micros(1500),
                response_bytes: 7,
                decisions: decisions.clone(),
                error: Some("upstream \"down\"".into()),
            };
            let client = client.parse().unwrap();
            let lite = r.begin(ProfileMode::Lite, Some("r"), p, client, "http");
            assert!(lite.captured, "lite records are made from a capture");
            let created = lite.created;
            let mut lite = lite.finish(ending());
            let mut full = r.begin(ProfileMode::Monitor, Some("r"), p, client, "http");
            full.created = created;
            let mut full = full.finish(ending());
            for key in ["body", "body_size", "body_truncated", "files"] {
                full["request"].as_object_mut().unwrap().remove(key);
            }
            lite["mode"] = json!("monitor");
            assert_eq!(lite, full);
            // Lowercased, without its port, from either place.
            assert_eq!(lite["request"]["host"], "example.test");
        }
    }

    #[test]
    fn addresses_are_written_as_they_display() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "203.0.113.255",
            "255.255.255.255",
            "::1",
            "2001:db8::42",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            address(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{ip}\""));
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        for (nanos, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_764_633_600_123_456_789, "2025-12-02T00:00:00.123Z"),
            (1_764_633_600_999_000_000, "2025-12-02T00:00:00.999Z"),
            (1_764_633_601_005_000_000, "2025-12-02T00:00:01.005Z"),
        ] {
            let mut out = Vec::new();
            timestamp(
                &mut out,
                SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
            );
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{text}\""));
        }
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
