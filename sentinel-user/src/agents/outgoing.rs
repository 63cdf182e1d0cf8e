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

use http::HeaderMap;
use sentinel_agent_protocol::{
    AgentRequest, Event, EventType, PROTOCOL_VERSION, RequestHeadersEvent, RequestMetadata,
    frame::{self, FrameError},
};
use serde::{
    Serialize, Serializer,
    ser::{SerializeMap, SerializeSeq, SerializeStruct},
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
            Outgoing::RequestHeaders(view) => frame::encode_json(&Envelope { view: *view, id }),
        }
    }
}

/// The envelope as `AgentRequest` writes it: version, event_type,
/// payload, then id.
struct Envelope<'a> {
    view: RequestHeadersView<'a>,
    id: Option<u64>,
}

impl Serialize for Envelope<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("version", &PROTOCOL_VERSION)?;
        map.serialize_entry("event_type", &EventType::RequestHeaders)?;
        map.serialize_entry("payload", &self.view)?;
        if let Some(id) = self.id {
            map.serialize_entry("id", &id)?;
        }
        map.end()
    }
}

/// Field for field what `RequestHeadersEvent` writes.
impl Serialize for RequestHeadersView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("RequestHeadersEvent", 4)?;
        s.serialize_field("metadata", self.metadata)?;
        s.serialize_field("method", self.method)?;
        s.serialize_field("uri", self.uri)?;
        s.serialize_field("headers", &HeadersView(self.headers))?;
        s.end()
    }
}

/// A `HeaderMap` as the protocol's `Headers` writes it: names in order,
/// each with its values in arrival order, non-UTF-8 bytes replaced.
struct HeadersView<'a>(&'a HeaderMap);

impl Serialize for HeadersView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut names: Vec<&http::HeaderName> = self.0.keys().collect();
        names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut map = serializer.serialize_map(Some(names.len()))?;
        for name in names {
            map.serialize_entry(name.as_str(), &Values(self.0, name))?;
        }
        map.end()
    }
}

struct Values<'a>(&'a HeaderMap, &'a http::HeaderName);

impl Serialize for Values<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        for value in self.0.get_all(self.1) {
            seq.serialize_element(&String::from_utf8_lossy(value.as_bytes()))?;
        }
        seq.end()
    }
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
        for headers in [headers, HeaderMap::new()] {
            let view = RequestHeadersView {
                metadata: &metadata,
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
