//! The gRPC transport: the generated `sentinel.agent.v1` messages, client
//! and server (module [`pb`]), and conversions between them and the JSON
//! types, so that both sides handle one set of types whatever the
//! transport.

use std::collections::BTreeMap;

use crate::{
    Audit, BodyChunkEvent, BodyMutation, ConfigureEvent, Decision, DecisionRecord, Event,
    GuardrailDetection, GuardrailInspectEvent, GuardrailResult, HeaderOp, Headers, KernelAction,
    KernelPush, KernelPushLimits, ProtocolError, RequestCompleteEvent, RequestHeadersEvent,
    RequestMetadata, ResponseHeadersEvent, WebsocketFrameEvent, WebsocketOpcode,
};

/// Generated from `proto/sentinel/agent/v1/agent.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("sentinel.agent.v1");
}

fn invalid(reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Invalid {
        reason: reason.into(),
    }
}

fn headers_to_pb(h: &Headers) -> std::collections::HashMap<String, pb::HeaderValues> {
    h.iter()
        .map(|(k, v)| (k.clone(), pb::HeaderValues { values: v.clone() }))
        .collect()
}

fn headers_from_pb(h: std::collections::HashMap<String, pb::HeaderValues>) -> Headers {
    h.into_iter().map(|(k, v)| (k, v.values)).collect()
}

fn metadata_to_pb(m: &RequestMetadata) -> pb::RequestMetadata {
    pb::RequestMetadata {
        correlation_id: m.correlation_id.clone(),
        request_id: m.request_id.clone(),
        client_ip: m.client_ip.clone(),
        client_port: u32::from(m.client_port),
        server_name: m.server_name.clone(),
        protocol: m.protocol.clone(),
        tls_version: m.tls_version.clone(),
        route_id: m.route_id.clone(),
        upstream_id: m.upstream_id.clone(),
        listener: m.listener.clone(),
        timestamp: m.timestamp.clone(),
    }
}

fn metadata_from_pb(m: pb::RequestMetadata) -> RequestMetadata {
    RequestMetadata {
        correlation_id: m.correlation_id,
        request_id: m.request_id,
        client_ip: m.client_ip,
        client_port: u16::try_from(m.client_port).unwrap_or(0),
        server_name: m.server_name,
        protocol: m.protocol,
        tls_version: m.tls_version,
        route_id: m.route_id,
        upstream_id: m.upstream_id,
        listener: m.listener,
        timestamp: m.timestamp,
    }
}

fn chunk_to_pb(c: &BodyChunkEvent) -> pb::BodyChunkEvent {
    pb::BodyChunkEvent {
        correlation_id: c.correlation_id.clone(),
        data: c.data.clone(),
        is_last: c.is_last,
        total_size: c.total_size,
        chunk_index: c.chunk_index,
        truncated: c.truncated,
        decompressed_from: c.decompressed_from.clone(),
    }
}

fn chunk_from_pb(c: pb::BodyChunkEvent) -> BodyChunkEvent {
    BodyChunkEvent {
        correlation_id: c.correlation_id,
        data: c.data,
        is_last: c.is_last,
        total_size: c.total_size,
        chunk_index: c.chunk_index,
        truncated: c.truncated,
        decompressed_from: c.decompressed_from,
    }
}

fn status16(status: u32) -> Result<u16, ProtocolError> {
    u16::try_from(status).map_err(|_| invalid(format!("status {status} is out of range")))
}

impl From<&crate::AgentRequest> for pb::AgentRequest {
    fn from(r: &crate::AgentRequest) -> Self {
        use pb::agent_request::Event as E;
        let (event_type, event) = match &r.event {
            Event::Configure(c) => (
                pb::EventType::Configure,
                E::Configure(pb::ConfigureEvent {
                    agent_id: c.agent_id.clone(),
                    config_json: c.config.to_string(),
                    extensions: c.extensions.clone(),
                    kernel_push: c.kernel_push.as_ref().map(|k| pb::KernelPushLimits {
                        max_ttl_seconds: k.max_ttl_seconds,
                        min_prefix_len_v4: u32::from(k.min_prefix_len_v4),
                        min_prefix_len_v6: u32::from(k.min_prefix_len_v6),
                    }),
                }),
            ),
            Event::RequestHeaders(h) => (
                pb::EventType::RequestHeaders,
                E::RequestHeaders(pb::RequestHeadersEvent {
                    metadata: Some(metadata_to_pb(&h.metadata)),
                    method: h.method.clone(),
                    uri: h.uri.clone(),
                    headers: headers_to_pb(&h.headers),
                }),
            ),
            Event::RequestBodyChunk(c) => (
                pb::EventType::RequestBodyChunk,
                E::RequestBodyChunk(chunk_to_pb(c)),
            ),
            Event::ResponseHeaders(h) => (
                pb::EventType::ResponseHeaders,
                E::ResponseHeaders(pb::ResponseHeadersEvent {
                    correlation_id: h.correlation_id.clone(),
                    status: u32::from(h.status),
                    headers: headers_to_pb(&h.headers),
                }),
            ),
            Event::ResponseBodyChunk(c) => (
                pb::EventType::ResponseBodyChunk,
                E::ResponseBodyChunk(chunk_to_pb(c)),
            ),
            Event::RequestComplete(c) => (
                pb::EventType::RequestComplete,
                E::RequestComplete(pb::RequestCompleteEvent {
                    correlation_id: c.correlation_id.clone(),
                    status: u32::from(c.status),
                    duration_ms: c.duration_ms,
                    request_body_size: c.request_body_size,
                    response_body_size: c.response_body_size,
                    upstream_attempts: c.upstream_attempts,
                    error: c.error.clone(),
                    metadata: c.metadata.as_ref().map(metadata_to_pb),
                    decisions: c
                        .decisions
                        .iter()
                        .map(|d| pb::DecisionRecord {
                            agent: d.agent.clone(),
                            decision: d.decision.clone(),
                            enforced: d.enforced,
                        })
                        .collect(),
                    record_json: c.record.as_ref().map(|r| r.to_string()),
                }),
            ),
            Event::WebsocketFrame(f) => (
                pb::EventType::WebsocketFrame,
                E::WebsocketFrame(pb::WebsocketFrameEvent {
                    correlation_id: f.correlation_id.clone(),
                    opcode: u32::from(f.opcode.code()),
                    data: f.data.clone(),
                    client_to_server: f.client_to_server,
                    frame_index: f.frame_index,
                    fin: f.fin,
                }),
            ),
            Event::GuardrailInspect(g) => (
                pb::EventType::GuardrailInspect,
                E::GuardrailInspect(pb::GuardrailInspectEvent {
                    correlation_id: g.correlation_id.clone(),
                    inspection_type: g.inspection_type.clone(),
                    content: g.content.clone(),
                    content_type: g.content_type.clone(),
                    truncated: g.truncated,
                }),
            ),
        };
        pb::AgentRequest {
            version: r.version,
            event_type: event_type as i32,
            event: Some(event),
        }
    }
}

impl TryFrom<pb::AgentRequest> for crate::AgentRequest {
    type Error = ProtocolError;

    fn try_from(r: pb::AgentRequest) -> Result<Self, ProtocolError> {
        use pb::agent_request::Event as E;
        if r.version != crate::PROTOCOL_VERSION {
            return Err(ProtocolError::Version { got: r.version });
        }
        let event = match r.event.ok_or_else(|| invalid("request without an event"))? {
            E::Configure(c) => Event::Configure(ConfigureEvent {
                agent_id: c.agent_id,
                config: if c.config_json.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_str(&c.config_json)?
                },
                extensions: c.extensions,
                kernel_push: c.kernel_push.map(|k| KernelPushLimits {
                    max_ttl_seconds: k.max_ttl_seconds,
                    min_prefix_len_v4: u8::try_from(k.min_prefix_len_v4).unwrap_or(32),
                    min_prefix_len_v6: u8::try_from(k.min_prefix_len_v6).unwrap_or(128),
                }),
            }),
            E::RequestHeaders(h) => Event::RequestHeaders(RequestHeadersEvent {
                metadata: h.metadata.map(metadata_from_pb).unwrap_or_default(),
                method: h.method,
                uri: h.uri,
                headers: headers_from_pb(h.headers),
            }),
            E::RequestBodyChunk(c) => Event::RequestBodyChunk(chunk_from_pb(c)),
            E::ResponseHeaders(h) => Event::ResponseHeaders(ResponseHeadersEvent {
                correlation_id: h.correlation_id,
                status: status16(h.status)?,
                headers: headers_from_pb(h.headers),
            }),
            E::ResponseBodyChunk(c) => Event::ResponseBodyChunk(chunk_from_pb(c)),
            E::RequestComplete(c) => Event::RequestComplete(RequestCompleteEvent {
                correlation_id: c.correlation_id,
                status: status16(c.status)?,
                duration_ms: c.duration_ms,
                request_body_size: c.request_body_size,
                response_body_size: c.response_body_size,
                upstream_attempts: c.upstream_attempts,
                error: c.error,
                metadata: c.metadata.map(metadata_from_pb),
                decisions: c
                    .decisions
                    .into_iter()
                    .map(|d| DecisionRecord {
                        agent: d.agent,
                        decision: d.decision,
                        enforced: d.enforced,
                    })
                    .collect(),
                record: c
                    .record_json
                    .map(|r| serde_json::from_str(&r))
                    .transpose()?,
            }),
            E::WebsocketFrame(f) => Event::WebsocketFrame(WebsocketFrameEvent {
                correlation_id: f.correlation_id,
                opcode: u8::try_from(f.opcode)
                    .ok()
                    .and_then(WebsocketOpcode::from_code)
                    .ok_or_else(|| invalid(format!("unknown WebSocket opcode {}", f.opcode)))?,
                data: f.data,
                client_to_server: f.client_to_server,
                frame_index: f.frame_index,
                fin: f.fin,
            }),
            E::GuardrailInspect(g) => Event::GuardrailInspect(GuardrailInspectEvent {
                correlation_id: g.correlation_id,
                inspection_type: g.inspection_type,
                content: g.content,
                content_type: g.content_type,
                truncated: g.truncated,
            }),
        };
        Ok(crate::AgentRequest {
            version: r.version,
            id: None,
            event,
        })
    }
}

fn ops_to_pb(ops: &[HeaderOp]) -> Vec<pb::HeaderOp> {
    use pb::header_op::Operation as O;
    ops.iter()
        .map(|op| pb::HeaderOp {
            operation: Some(match op {
                HeaderOp::Set { name, value } => O::Set(pb::SetHeader {
                    name: name.clone(),
                    value: value.clone(),
                }),
                HeaderOp::Add { name, value } => O::Add(pb::AddHeader {
                    name: name.clone(),
                    value: value.clone(),
                }),
                HeaderOp::Remove { name } => O::Remove(pb::RemoveHeader { name: name.clone() }),
            }),
        })
        .collect()
}

fn ops_from_pb(ops: Vec<pb::HeaderOp>) -> Result<Vec<HeaderOp>, ProtocolError> {
    use pb::header_op::Operation as O;
    ops.into_iter()
        .map(|op| match op.operation {
            Some(O::Set(s)) => Ok(HeaderOp::Set {
                name: s.name,
                value: s.value,
            }),
            Some(O::Add(a)) => Ok(HeaderOp::Add {
                name: a.name,
                value: a.value,
            }),
            Some(O::Remove(r)) => Ok(HeaderOp::Remove { name: r.name }),
            None => Err(invalid("header operation without set, add or remove")),
        })
        .collect()
}

impl From<&crate::AgentResponse> for pb::AgentResponse {
    fn from(r: &crate::AgentResponse) -> Self {
        use pb::agent_response::Decision as D;
        let decision = match &r.decision {
            Decision::Allow => D::Allow(pb::AllowDecision {}),
            Decision::Block {
                status,
                body,
                headers,
            } => D::Block(pb::BlockDecision {
                status: u32::from(*status),
                body: body.clone(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
            Decision::Redirect { url, status } => D::Redirect(pb::RedirectDecision {
                url: url.clone(),
                status: u32::from(*status),
            }),
            Decision::Challenge {
                challenge_type,
                params,
            } => D::Challenge(pb::ChallengeDecision {
                challenge_type: challenge_type.clone(),
                params: params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            }),
        };
        pb::AgentResponse {
            version: r.version,
            decision: Some(decision),
            request_headers: ops_to_pb(&r.request_headers),
            response_headers: ops_to_pb(&r.response_headers),
            routing_metadata: r
                .routing_metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            audit: r.audit.as_ref().map(|a| pb::AuditMetadata {
                tags: a.tags.clone(),
                rule_ids: a.rule_ids.clone(),
                confidence: a.confidence,
                reason_codes: a.reason_codes.clone(),
                custom: a
                    .custom
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
            }),
            body_mutation: r.body_mutation.as_ref().map(|m| pb::BodyMutation {
                data: m.data.clone(),
            }),
            guardrail: r.guardrail.as_ref().map(|g| pb::GuardrailResult {
                detected: g.detected,
                confidence: g.confidence,
                detections: g
                    .detections
                    .iter()
                    .map(|d| pb::GuardrailDetection {
                        category: d.category.clone(),
                        description: d.description.clone(),
                        start: d.start,
                        end: d.end,
                    })
                    .collect(),
            }),
            kernel_push: r.kernel_push.as_ref().map(|k| pb::KernelPush {
                action: match k.action {
                    KernelAction::Deny => pb::KernelAction::Deny,
                    KernelAction::Watch => pb::KernelAction::Watch,
                } as i32,
                prefix: k.prefix.clone(),
                ttl_seconds: k.ttl_seconds,
                reason: k.reason.clone(),
            }),
            extensions: r.extensions.clone(),
        }
    }
}

impl TryFrom<pb::AgentResponse> for crate::AgentResponse {
    type Error = ProtocolError;

    fn try_from(r: pb::AgentResponse) -> Result<Self, ProtocolError> {
        use pb::agent_response::Decision as D;
        let decision = match r.decision {
            None | Some(D::Allow(_)) => Decision::Allow,
            Some(D::Block(b)) => Decision::Block {
                status: if b.status == 0 {
                    403
                } else {
                    status16(b.status)?
                },
                body: b.body,
                headers: b.headers.into_iter().collect(),
            },
            Some(D::Redirect(rd)) => Decision::Redirect {
                url: rd.url,
                status: if rd.status == 0 {
                    302
                } else {
                    status16(rd.status)?
                },
            },
            Some(D::Challenge(c)) => Decision::Challenge {
                challenge_type: c.challenge_type,
                params: c.params.into_iter().collect(),
            },
        };
        let custom: BTreeMap<String, serde_json::Value> = match &r.audit {
            Some(a) => a
                .custom
                .iter()
                .map(|(k, v)| {
                    // Custom values are JSON text; plain text is kept as a
                    // string rather than refused.
                    let value = serde_json::from_str(v)
                        .unwrap_or_else(|_| serde_json::Value::String(v.clone()));
                    (k.clone(), value)
                })
                .collect(),
            None => BTreeMap::new(),
        };
        let response = crate::AgentResponse {
            version: r.version,
            id: None,
            decision,
            request_headers: ops_from_pb(r.request_headers)?,
            response_headers: ops_from_pb(r.response_headers)?,
            routing_metadata: r.routing_metadata.into_iter().collect(),
            audit: r.audit.map(|a| Audit {
                tags: a.tags,
                rule_ids: a.rule_ids,
                confidence: a.confidence,
                reason_codes: a.reason_codes,
                custom,
            }),
            body_mutation: r.body_mutation.map(|m| BodyMutation { data: m.data }),
            guardrail: r.guardrail.map(|g| GuardrailResult {
                detected: g.detected,
                confidence: g.confidence,
                detections: g
                    .detections
                    .into_iter()
                    .map(|d| GuardrailDetection {
                        category: d.category,
                        description: d.description,
                        start: d.start,
                        end: d.end,
                    })
                    .collect(),
            }),
            kernel_push: match r.kernel_push {
                Some(k) => Some(KernelPush {
                    action: match pb::KernelAction::try_from(k.action) {
                        Ok(pb::KernelAction::Deny) => KernelAction::Deny,
                        Ok(pb::KernelAction::Watch) => KernelAction::Watch,
                        Err(_) => {
                            return Err(invalid(format!("unknown kernel action {}", k.action)));
                        }
                    },
                    prefix: k.prefix,
                    ttl_seconds: k.ttl_seconds,
                    reason: k.reason,
                }),
                None => None,
            },
            extensions: r.extensions,
        };
        response.validate()?;
        Ok(response)
    }
}
