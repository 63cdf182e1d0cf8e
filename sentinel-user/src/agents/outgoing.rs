//! What a call sends: an owned request, or the `request_headers` event as
//! a view of the request head.
//!
//! `request_headers` is the event every filtered request sends. Built as
//! the protocol's owned struct it costs a copy of the metadata and a
//! `BTreeMap` of copied header strings per filter, all dropped as soon as
//! the JSON is written. On the Unix socket the view is serialized straight
//! from the request's `HeaderMap` and the exchange's metadata into the
//! frame, to the same bytes (a test compares them); gRPC and HTTP, which
//! need the owned form, get it built from the view.
//!
//! The frame is written by hand (see [`view_frame`]); the test checks it
//! byte for byte against what serde writes for the owned event.

use http::HeaderMap;
use sentinel_agent_protocol::{
    AgentRequest, Event, EventType, MAX_MESSAGE_SIZE, PROTOCOL_VERSION, RequestHeadersEvent,
    RequestMetadata,
    frame::{self, FrameError},
};

use super::pipeline::to_protocol;

// Unboxed: the request used to travel by value as well, and a box would
// be one more allocation per call.
#[allow(clippy::large_enum_variant)]
pub enum Outgoing<'a> {
    Request(AgentRequest),
    RequestHeaders(RequestHeadersView<'a>),
}

/// A `request_headers` event, borrowed from the request it describes.
#[derive(Clone, Copy)]
pub struct RequestHeadersView<'a> {
    pub metadata: &'a RequestMetadata,
    pub method: &'a str,
    pub uri: &'a str,
    pub headers: &'a HeaderMap,
}

impl RequestHeadersView<'_> {
    pub fn to_event(self) -> RequestHeadersEvent {
        RequestHeadersEvent {
            metadata: self.metadata.clone(),
            method: self.method.to_owned(),
            uri: self.uri.to_owned(),
            headers: to_protocol(self.headers),
        }
    }
}

impl Outgoing<'_> {
    pub fn event_type(&self) -> EventType {
        match self {
            Outgoing::Request(r) => r.event.event_type(),
            Outgoing::RequestHeaders(_) => EventType::RequestHeaders,
        }
    }

    /// The owned request, for the transports that need one.
    pub fn into_request(self) -> AgentRequest {
        match self {
            Outgoing::Request(r) => r,
            Outgoing::RequestHeaders(v) => AgentRequest::new(Event::RequestHeaders(v.to_event())),
        }
    }

    /// The Unix-socket frame, with `id` on a multiplexed connection.
    pub fn frame(&mut self, id: Option<u64>) -> Result<Vec<u8>, FrameError> {
        match self {
            Outgoing::Request(r) => {
                r.id = id;
                frame::encode_json(r)
            }
            Outgoing::RequestHeaders(view) => view_frame(view, id),
        }
    }
}

/// The frame of the envelope as `AgentRequest` writes it (version,
/// event_type, payload, then id; the event's fields in their declared
/// order, absent options left out), written by hand: serde_json looks up
/// every byte of every string in its escape table, which was most of the
/// cost of the call on this side. Strings that need no escape are copied
/// as they are; the others go through serde_json, so the bytes are its.
fn view_frame(view: &RequestHeadersView<'_>, id: Option<u64>) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(b"{\"version\":");
    number(&mut out, u64::from(PROTOCOL_VERSION));
    out.extend_from_slice(b",\"event_type\":\"request_headers\",\"payload\":{\"metadata\":");
    metadata(&mut out, view.metadata);
    out.extend_from_slice(b",\"method\":");
    string(&mut out, view.method);
    out.extend_from_slice(b",\"uri\":");
    string(&mut out, view.uri);
    out.extend_from_slice(b",\"headers\":");
    headers(&mut out, view.headers);
    out.push(b'}');
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        number(&mut out, id);
    }
    out.push(b'}');
    let len = out.len() - 4;
    if len > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_MESSAGE_SIZE,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

fn metadata(out: &mut Vec<u8>, m: &RequestMetadata) {
    out.extend_from_slice(b"{\"correlation_id\":");
    string(out, &m.correlation_id);
    out.extend_from_slice(b",\"request_id\":");
    string(out, &m.request_id);
    out.extend_from_slice(b",\"client_ip\":");
    string(out, &m.client_ip);
    out.extend_from_slice(b",\"client_port\":");
    number(out, u64::from(m.client_port));
    optional(out, b",\"server_name\":", &m.server_name);
    out.extend_from_slice(b",\"protocol\":");
    string(out, &m.protocol);
    optional(out, b",\"tls_version\":", &m.tls_version);
    optional(out, b",\"route_id\":", &m.route_id);
    optional(out, b",\"upstream_id\":", &m.upstream_id);
    optional(out, b",\"listener\":", &m.listener);
    out.extend_from_slice(b",\"timestamp\":");
    string(out, &m.timestamp);
    out.push(b'}');
}

fn optional(out: &mut Vec<u8>, key: &[u8], value: &Option<String>) {
    if let Some(v) = value {
        out.extend_from_slice(key);
        string(out, v);
    }
}

/// Names in order, each with its values in arrival order, non-UTF-8
/// bytes replaced: what the protocol's `Headers` map writes.
fn headers(out: &mut Vec<u8>, map: &HeaderMap) {
    // On the stack for the usual few names.
    let mut few: [Option<&http::HeaderName>; 32] = [None; 32];
    let mut many = Vec::new();
    let names: &mut [Option<&http::HeaderName>] = if map.keys_len() <= few.len() {
        for (slot, name) in few.iter_mut().zip(map.keys()) {
            *slot = Some(name);
        }
        &mut few[..map.keys_len()]
    } else {
        many.extend(map.keys().map(Some));
        &mut many
    };
    names.sort_unstable_by(|a, b| a.map(|n| n.as_str()).cmp(&b.map(|n| n.as_str())));
    out.push(b'{');
    for (i, &name) in names.iter().flatten().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, name.as_str());
        out.extend_from_slice(b":[");
        for (j, value) in map.get_all(name).iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            match value.to_str() {
                Ok(text) => string(out, text),
                Err(_) => string(out, &String::from_utf8_lossy(value.as_bytes())),
            }
        }
        out.push(b']');
    }
    out.push(b'}');
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn string(out: &mut Vec<u8>, s: &str) {
    sentinel_agent_protocol::json::write_str(out, s);
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn the_view_writes_what_the_owned_event_writes() {
        let mut headers = HeaderMap::new();
        headers.append("x-b", HeaderValue::from_static("2"));
        headers.append("accept", HeaderValue::from_static("a"));
        headers.append("x-b", HeaderValue::from_static("1"));
        headers.append("host", HeaderValue::from_static("h.test"));
        headers.append("x-bin", HeaderValue::from_bytes(b"caf\xe9 \"q\"").unwrap());
        headers.append("accept", HeaderValue::from_static("b"));
        let metadata = RequestMetadata {
            correlation_id: "c".into(),
            request_id: "r".into(),
            client_ip: "192.0.2.1".into(),
            client_port: 4242,
            server_name: Some("h.test".into()),
            protocol: "HTTP/1.1".into(),
            tls_version: None,
            route_id: Some("api".into()),
            upstream_id: None,
            listener: Some("main".into()),
            timestamp: "2026-12-01T00:00:00.000Z".into(),
        };
        headers.append("x-ctl", HeaderValue::from_bytes(b"a\tb\\\"\xff").unwrap());
        headers.append(
            "x-long",
            HeaderValue::from_static("0123456789abcdef\"0123456789"),
        );
        let mut bare = metadata.clone();
        bare.server_name = None;
        bare.route_id = None;
        bare.listener = None;
        bare.tls_version = Some("TLSv1.3".into());
        bare.upstream_id = Some("b\u{e9}\n".into());
        bare.request_id = "12345678\\abc".into();
        for (headers, metadata) in [
            (headers.clone(), &metadata),
            (HeaderMap::new(), &metadata),
            (headers, &bare),
        ] {
            let view = RequestHeadersView {
                metadata,
                method: "GET",
                uri: "/a?b=\"c\"",
                headers: &headers,
            };
            for id in [None, Some(7)] {
                let mut owned = AgentRequest::new(Event::RequestHeaders(view.to_event()));
                owned.id = id;
                assert_eq!(
                    Outgoing::RequestHeaders(view).frame(id).unwrap(),
                    frame::encode_json(&owned).unwrap()
                );
            }
        }
    }
}
