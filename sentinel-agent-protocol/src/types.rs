//! The messages of protocol v1, as JSON sees them.
//!
//! Field names are the wire names. Optional fields are omitted when empty
//! and default when absent, so that either side can be older than the other
//! by any number of additive changes.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, MapAccess, Visitor},
    ser::SerializeMap,
};
use serde_json::value::RawValue;

/// Header names (lowercase) and their values, in arrival order per name.
pub type Headers = BTreeMap<String, Vec<String>>;

/// The eight event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Configure,
    RequestHeaders,
    RequestBodyChunk,
    ResponseHeaders,
    ResponseBodyChunk,
    RequestComplete,
    WebsocketFrame,
    GuardrailInspect,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        EventType::Configure,
        EventType::RequestHeaders,
        EventType::RequestBodyChunk,
        EventType::ResponseHeaders,
        EventType::ResponseBodyChunk,
        EventType::RequestComplete,
        EventType::WebsocketFrame,
        EventType::GuardrailInspect,
    ];

    /// The wire name (`request_headers`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::Configure => "configure",
            EventType::RequestHeaders => "request_headers",
            EventType::RequestBodyChunk => "request_body_chunk",
            EventType::ResponseHeaders => "response_headers",
            EventType::ResponseBodyChunk => "response_body_chunk",
            EventType::RequestComplete => "request_complete",
            EventType::WebsocketFrame => "websocket_frame",
            EventType::GuardrailInspect => "guardrail_inspect",
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event and its payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Configure(ConfigureEvent),
    RequestHeaders(RequestHeadersEvent),
    RequestBodyChunk(BodyChunkEvent),
    ResponseHeaders(ResponseHeadersEvent),
    ResponseBodyChunk(BodyChunkEvent),
    RequestComplete(RequestCompleteEvent),
    WebsocketFrame(WebsocketFrameEvent),
    GuardrailInspect(GuardrailInspectEvent),
}

impl Event {
    pub fn event_type(&self) -> EventType {
        match self {
            Event::Configure(_) => EventType::Configure,
            Event::RequestHeaders(_) => EventType::RequestHeaders,
            Event::RequestBodyChunk(_) => EventType::RequestBodyChunk,
            Event::ResponseHeaders(_) => EventType::ResponseHeaders,
            Event::ResponseBodyChunk(_) => EventType::ResponseBodyChunk,
            Event::RequestComplete(_) => EventType::RequestComplete,
            Event::WebsocketFrame(_) => EventType::WebsocketFrame,
            Event::GuardrailInspect(_) => EventType::GuardrailInspect,
        }
    }

    /// The request this event belongs to; empty for `configure`.
    pub fn correlation_id(&self) -> &str {
        match self {
            Event::Configure(_) => "",
            Event::RequestHeaders(e) => &e.metadata.correlation_id,
            Event::RequestBodyChunk(e) | Event::ResponseBodyChunk(e) => &e.correlation_id,
            Event::ResponseHeaders(e) => &e.correlation_id,
            Event::RequestComplete(e) => &e.correlation_id,
            Event::WebsocketFrame(e) => &e.correlation_id,
            Event::GuardrailInspect(e) => &e.correlation_id,
        }
    }
}

/// The envelope: `{"version": 1, "event_type": "...", "payload": {...}}`,
/// plus `"id"` on a multiplexed Unix-socket connection.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRequest {
    pub version: u32,
    /// Extension: set only on a connection whose agent accepted the
    /// `multiplex` extension; its response must echo it.
    pub id: Option<u64>,
    pub event: Event,
}

impl Serialize for AgentRequest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("version", &self.version)?;
        map.serialize_entry("event_type", &self.event.event_type())?;
        match &self.event {
            Event::Configure(p) => map.serialize_entry("payload", p)?,
            Event::RequestHeaders(p) => map.serialize_entry("payload", p)?,
            Event::RequestBodyChunk(p) | Event::ResponseBodyChunk(p) => {
                map.serialize_entry("payload", p)?
            }
            Event::ResponseHeaders(p) => map.serialize_entry("payload", p)?,
            Event::RequestComplete(p) => map.serialize_entry("payload", p)?,
            Event::WebsocketFrame(p) => map.serialize_entry("payload", p)?,
            Event::GuardrailInspect(p) => map.serialize_entry("payload", p)?,
        }
        if let Some(id) = self.id {
            map.serialize_entry("id", &id)?;
        }
        map.end()
    }
}

/// One pass over the envelope: when `event_type` comes before `payload`
/// (as this crate and the seed write it) the payload is read straight into
/// its type; otherwise it is kept raw and read once the type is known.
impl<'de> Deserialize<'de> for AgentRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(Envelope { recycled: None })
    }
}

impl AgentRequest {
    /// Reads an envelope as [`Deserialize`] does, a `request_headers`
    /// payload into the allocations of `recycled` (taken; see
    /// [`AgentRequest::recycle`]).
    pub(crate) fn deserialize_recycling<'de, D: Deserializer<'de>>(
        deserializer: D,
        recycled: &mut Option<RequestHeadersEvent>,
    ) -> Result<Self, D::Error> {
        deserializer.deserialize_map(Envelope {
            recycled: Some(recycled),
        })
    }

    /// Gives this request's `request_headers` event (if it is one) back for
    /// the next [`AgentRequest::from_json_recycling`].
    pub fn recycle(self, into: &mut Option<RequestHeadersEvent>) {
        if let Event::RequestHeaders(event) = self.event {
            *into = Some(event);
        }
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum EnvelopeField {
    Version,
    EventType,
    Payload,
    Id,
    #[serde(other)]
    Other,
}

fn typed<'de, A: MapAccess<'de>>(
    kind: EventType,
    map: &mut A,
    recycled: Option<&mut Option<RequestHeadersEvent>>,
) -> Result<Event, A::Error> {
    Ok(match kind {
        EventType::Configure => Event::Configure(map.next_value()?),
        EventType::RequestHeaders => match recycled {
            Some(spare) => {
                let mut event = spare.take().unwrap_or_default();
                map.next_value_seed(crate::recycle::EventInPlace(&mut event))?;
                Event::RequestHeaders(event)
            }
            None => Event::RequestHeaders(map.next_value()?),
        },
        EventType::RequestBodyChunk => Event::RequestBodyChunk(map.next_value()?),
        EventType::ResponseHeaders => Event::ResponseHeaders(map.next_value()?),
        EventType::ResponseBodyChunk => Event::ResponseBodyChunk(map.next_value()?),
        EventType::RequestComplete => Event::RequestComplete(map.next_value()?),
        EventType::WebsocketFrame => Event::WebsocketFrame(map.next_value()?),
        EventType::GuardrailInspect => Event::GuardrailInspect(map.next_value()?),
    })
}

fn from_raw<E: de::Error>(kind: EventType, raw: &str) -> Result<Event, E> {
    fn parse<'a, T: Deserialize<'a>, E: de::Error>(raw: &'a str) -> Result<T, E> {
        serde_json::from_str(raw).map_err(E::custom)
    }
    Ok(match kind {
        EventType::Configure => Event::Configure(parse(raw)?),
        EventType::RequestHeaders => Event::RequestHeaders(parse(raw)?),
        EventType::RequestBodyChunk => Event::RequestBodyChunk(parse(raw)?),
        EventType::ResponseHeaders => Event::ResponseHeaders(parse(raw)?),
        EventType::ResponseBodyChunk => Event::ResponseBodyChunk(parse(raw)?),
        EventType::RequestComplete => Event::RequestComplete(parse(raw)?),
        EventType::WebsocketFrame => Event::WebsocketFrame(parse(raw)?),
        EventType::GuardrailInspect => Event::GuardrailInspect(parse(raw)?),
    })
}

struct Envelope<'r> {
    recycled: Option<&'r mut Option<RequestHeadersEvent>>,
}

impl<'de> Visitor<'de> for Envelope<'_> {
    type Value = AgentRequest;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with version, event_type and payload")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<AgentRequest, A::Error> {
        let mut version = None;
        let mut kind: Option<EventType> = None;
        let mut event = None;
        let mut raw: Option<Box<RawValue>> = None;
        let mut id = None;
        while let Some(field) = map.next_key::<EnvelopeField>()? {
            match field {
                EnvelopeField::Version => version = Some(map.next_value::<u32>()?),
                EnvelopeField::EventType => kind = Some(map.next_value()?),
                EnvelopeField::Payload => match kind {
                    Some(k) => event = Some(typed(k, &mut map, self.recycled.as_deref_mut())?),
                    None => raw = Some(map.next_value()?),
                },
                EnvelopeField::Id => id = map.next_value()?,
                EnvelopeField::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        let version = version.ok_or_else(|| de::Error::missing_field("version"))?;
        let kind = kind.ok_or_else(|| de::Error::missing_field("event_type"))?;
        let event = match (event, raw) {
            (Some(e), _) => e,
            (None, Some(raw)) => from_raw(kind, raw.get())?,
            (None, None) => return Err(de::Error::missing_field("payload")),
        };
        Ok(AgentRequest { version, id, event })
    }
}

/// Sent first on every connection (Unix socket) or before the first event
/// (gRPC, HTTP): who the agent is to the proxy and its `config` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ConfigureEvent {
    /// The agent's name in the proxy's configuration.
    pub agent_id: String,
    /// The agent's `config { ... }` block as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Extension: what the proxy offers ([`crate::extensions`]); the
    /// agent accepts some by listing them in its answer's `extensions`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<String>,
    /// Extension: the limits of kernel pushes, when this agent may push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_push: Option<KernelPushLimits>,
}

/// What a pushing agent may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPushLimits {
    pub max_ttl_seconds: u64,
    pub min_prefix_len_v4: u8,
    pub min_prefix_len_v6: u8,
}

/// Facts about the request, first sent with its headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RequestMetadata {
    /// Links every event of one request.
    pub correlation_id: String,
    /// The request's `X-Request-Id`.
    pub request_id: String,
    pub client_ip: String,
    #[serde(default)]
    pub client_port: u16,
    /// SNI, else the Host header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// `HTTP/1.1`, `HTTP/2`, ...
    #[serde(default)]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<String>,
    /// The listener that accepted the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// RFC 3339, UTC.
    #[serde(default)]
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RequestHeadersEvent {
    pub metadata: RequestMetadata,
    pub method: String,
    /// Path and query, as the client sent them.
    pub uri: String,
    #[serde(default)]
    pub headers: Headers,
}

/// A piece of a request or response body. In `buffer` mode the whole body
/// (up to the agent's limit) is one chunk with `is_last` set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BodyChunkEvent {
    pub correlation_id: String,
    /// The bytes, base64 (standard alphabet, padded) in JSON.
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
    pub is_last: bool,
    /// Total body size, when known in advance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<u64>,
    /// 0 for the first chunk.
    #[serde(default)]
    pub chunk_index: u32,
    /// Extension: the body went on past what the agent is sent
    /// (`max-*-body-bytes`, `max-body-inspection-bytes`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
    /// Extension: the `Content-Encoding` the proxy removed before sending
    /// (`waf { body-inspection { decompress #true } }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decompressed_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ResponseHeadersEvent {
    pub correlation_id: String,
    pub status: u16,
    #[serde(default)]
    pub headers: Headers,
}

/// Sent once the response is complete (the `log` subscription).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RequestCompleteEvent {
    pub correlation_id: String,
    pub status: u16,
    pub duration_ms: u64,
    #[serde(default)]
    pub request_body_size: u64,
    #[serde(default)]
    pub response_body_size: u64,
    #[serde(default)]
    pub upstream_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Extension: the request's metadata again, so a log-only agent needs
    /// no other event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RequestMetadata>,
    /// Extension: decisions taken on this request, by agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<DecisionRecord>,
    /// Extension: the request's metadata record (runtime profile), when
    /// the profile produces one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
}

/// One agent's verdict on a request, as reported in `request_complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DecisionRecord {
    pub agent: String,
    /// `allow`, `block`, `redirect` or `challenge`.
    pub decision: String,
    /// False when the decision was only recorded (monitor mode) or failed
    /// open.
    pub enforced: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebsocketOpcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl WebsocketOpcode {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }
}

/// A WebSocket frame, after the upgrade, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebsocketFrameEvent {
    pub correlation_id: String,
    pub opcode: WebsocketOpcode,
    /// Unmasked payload, base64 in JSON.
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
    /// True from the client towards the upstream.
    pub client_to_server: bool,
    /// Per direction, from 0.
    pub frame_index: u64,
    pub fin: bool,
}

/// Content for a guardrail (prompt injection, PII) check: the request
/// body's text, decompressed when the waf block says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuardrailInspectEvent {
    pub correlation_id: String,
    /// `prompt_injection` or `pii_detection`.
    pub inspection_type: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
}

/// What the agent decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Decision {
    /// Continue. The default when a response names no decision.
    #[default]
    Allow,
    /// Answer the client with this instead of forwarding.
    Block {
        status: u16,
        body: Option<String>,
        headers: BTreeMap<String, String>,
    },
    /// Answer with a redirect (301, 302, 307 or 308).
    Redirect { url: String, status: u16 },
    /// Challenge the client; it gets through only once it has passed.
    Challenge {
        challenge_type: String,
        params: BTreeMap<String, String>,
    },
}

impl Decision {
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Block { .. } => "block",
            Decision::Redirect { .. } => "redirect",
            Decision::Challenge { .. } => "challenge",
        }
    }

    pub fn block(status: u16) -> Self {
        Decision::Block {
            status,
            body: None,
            headers: BTreeMap::new(),
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct BlockFields {
    #[serde(default = "default_block_status")]
    status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

fn default_block_status() -> u16 {
    403
}

#[derive(Serialize, Deserialize)]
struct RedirectFields {
    url: String,
    #[serde(default = "default_redirect_status")]
    status: u16,
}

fn default_redirect_status() -> u16 {
    302
}

#[derive(Serialize, Deserialize, Default)]
struct ChallengeFields {
    #[serde(default)]
    challenge_type: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    params: BTreeMap<String, String>,
}

/// `"allow"` as a string (the seed's form); the others as a one-key object,
/// `{"block": {"status": 403, ...}}`.
impl Serialize for Decision {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Decision::Allow => serializer.serialize_str("allow"),
            Decision::Block {
                status,
                body,
                headers,
            } => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "block",
                    &BlockFields {
                        status: *status,
                        body: body.clone(),
                        headers: headers.clone(),
                    },
                )?;
                map.end()
            }
            Decision::Redirect { url, status } => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "redirect",
                    &RedirectFields {
                        url: url.clone(),
                        status: *status,
                    },
                )?;
                map.end()
            }
            Decision::Challenge {
                challenge_type,
                params,
            } => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "challenge",
                    &ChallengeFields {
                        challenge_type: challenge_type.clone(),
                        params: params.clone(),
                    },
                )?;
                map.end()
            }
        }
    }
}

/// Accepts `"allow"`, `"block"` (403), `{"allow": {}}`, `{"block": {...}}`,
/// `{"redirect": {...}}` and `{"challenge": {...}}`.
impl<'de> Deserialize<'de> for Decision {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DecisionVisitor;

        impl<'de> Visitor<'de> for DecisionVisitor {
            type Value = Decision;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""allow", "block", or an object such as {"block": {"status": 403}}"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Decision, E> {
                match v {
                    "allow" => Ok(Decision::Allow),
                    "block" => Ok(Decision::block(default_block_status())),
                    "redirect" | "challenge" => Err(E::custom(format!(
                        "decision \"{v}\" needs its fields: {{\"{v}\": {{...}}}}"
                    ))),
                    other => Err(E::unknown_variant(
                        other,
                        &["allow", "block", "redirect", "challenge"],
                    )),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Decision, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("empty decision object"));
                };
                let decision = match key.as_str() {
                    "allow" => {
                        map.next_value::<de::IgnoredAny>()?;
                        Decision::Allow
                    }
                    "block" => {
                        let f: Option<BlockFields> = map.next_value()?;
                        let f = f.unwrap_or_default();
                        Decision::Block {
                            status: if f.status == 0 {
                                default_block_status()
                            } else {
                                f.status
                            },
                            body: f.body,
                            headers: f.headers,
                        }
                    }
                    "redirect" => {
                        let f: RedirectFields = map.next_value()?;
                        Decision::Redirect {
                            url: f.url,
                            status: f.status,
                        }
                    }
                    "challenge" => {
                        let f: Option<ChallengeFields> = map.next_value()?;
                        let f = f.unwrap_or_default();
                        Decision::Challenge {
                            challenge_type: f.challenge_type,
                            params: f.params,
                        }
                    }
                    other => {
                        return Err(de::Error::unknown_variant(
                            other,
                            &["allow", "block", "redirect", "challenge"],
                        ));
                    }
                };
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("a decision object has exactly one key"));
                }
                Ok(decision)
            }
        }

        deserializer.deserialize_any(DecisionVisitor)
    }
}

/// A header mutation: `{"set": {...}}`, `{"add": {...}}`, `{"remove": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderOp {
    /// Replaces every value of the header.
    Set { name: String, value: String },
    /// Appends a value.
    Add { name: String, value: String },
    /// Removes every value.
    Remove { name: String },
}

/// What a request's logs and metrics say about the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Audit {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reason_codes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom: BTreeMap<String, serde_json::Value>,
}

impl Audit {
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
            && self.rule_ids.is_empty()
            && self.confidence.is_none()
            && self.reason_codes.is_empty()
            && self.custom.is_empty()
    }
}

/// Replaces the body chunk (or WebSocket frame payload) the event carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BodyMutation {
    /// `None`: unchanged; empty: the chunk is dropped; otherwise the new
    /// bytes (base64 in JSON).
    #[serde(default, with = "base64_bytes_opt")]
    pub data: Option<Vec<u8>>,
}

/// What a guardrail check found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GuardrailResult {
    pub detected: bool,
    #[serde(default)]
    pub confidence: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detections: Vec<GuardrailDetection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuardrailDetection {
    pub category: String,
    #[serde(default)]
    pub description: String,
    /// Byte offsets into the content, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<u64>,
}

/// What a kernel push does with the client's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KernelAction {
    /// Add it to the XDP denylist: its packets are dropped.
    #[default]
    Deny,
    /// Add it to the watchlist: its connections are steered to the
    /// quarantine listener.
    Watch,
}

/// Extension: ask for the client to be denied or watched in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KernelPush {
    #[serde(default)]
    pub action: KernelAction,
    /// CIDR that must contain the client's address; default its /32 or
    /// /128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Default and upper bound: the agent's `max-ttl-seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The agent's answer to one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentResponse {
    pub version: u32,
    /// Extension: the `id` of the request this answers (multiplexed
    /// connections only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default)]
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_headers: Vec<HeaderOp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers: Vec<HeaderOp>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routing_metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<Audit>,
    /// Extension: for body-chunk and WebSocket-frame events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_mutation: Option<BodyMutation>,
    /// Extension: for `guardrail_inspect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrail: Option<GuardrailResult>,
    /// Extension: deny or watch the client in the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_push: Option<KernelPush>,
    /// Extension, in the answer to `configure`: the offered extensions
    /// this agent accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<String>,
}

impl Default for AgentResponse {
    fn default() -> Self {
        Self {
            version: crate::PROTOCOL_VERSION,
            id: None,
            decision: Decision::Allow,
            request_headers: Vec::new(),
            response_headers: Vec::new(),
            routing_metadata: BTreeMap::new(),
            audit: None,
            body_mutation: None,
            guardrail: None,
            kernel_push: None,
            extensions: Vec::new(),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

mod base64_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| de::Error::custom(format!("invalid base64: {e}")))
    }
}

mod base64_bytes_opt {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        text.map(|t| {
            base64::engine::general_purpose::STANDARD
                .decode(t.as_bytes())
                .map_err(|e| de::Error::custom(format!("invalid base64: {e}")))
        })
        .transpose()
    }
}
