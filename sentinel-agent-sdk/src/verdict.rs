//! The decision builder: what a hook answers.

use sentinel_agent_protocol::{
    AgentResponse, Audit, BodyMutation, Decision, GuardrailResult, HeaderOp, KernelAction,
    KernelPush, ProtocolError,
};

/// Why a [`Verdict`] cannot become an answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerdictError {
    /// What the protocol itself refuses: a block status outside 200-599, a
    /// redirect status other than 301/302/307/308, a redirect without a url.
    #[error("{reason}")]
    Protocol { reason: String },
    #[error("{method} applies only to a block decision, not to {decision}")]
    NotABlock {
        method: &'static str,
        decision: &'static str,
    },
    #[error("{method} needs a kernel push first (kernel_deny, kernel_watch or kernel_push)")]
    NoKernelPush { method: &'static str },
    #[error("invalid header name {name:?}")]
    HeaderName { name: String },
    #[error("invalid value for header {name:?}")]
    HeaderValue { name: String },
    #[error("{what} confidence {value} is not between 0 and 1")]
    Confidence { what: &'static str, value: f64 },
    #[error("kernel push prefix {prefix:?} is not a CIDR")]
    KernelPrefix { prefix: String },
    #[error("kernel push TTL of 0 seconds")]
    KernelTtl,
}

/// A hook's answer, built fluently; [`Verdict::build`] checks it and turns
/// it into the protocol's [`AgentResponse`].
///
/// ```
/// use sentinel_agent_sdk::Verdict;
///
/// let answer = Verdict::block(429)
///     .with_body("slow down")
///     .with_header("Retry-After", "5")
///     .audit_tag("rate-limit")
///     .rule_id("rl-1")
///     .build()
///     .unwrap();
/// assert_eq!(answer.decision.name(), "block");
/// ```
///
/// Mutations accumulate in the order they are added; the proxy applies
/// them in that order. Mistakes are not reported where they are made but
/// by [`build`](Verdict::build), so that a chain stays a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    response: AgentResponse,
    /// The first misuse of the builder, reported by `build`.
    misuse: Option<VerdictError>,
}

impl Default for Verdict {
    fn default() -> Self {
        Self::allow()
    }
}

impl From<AgentResponse> for Verdict {
    /// Takes a response as it is; `build` still checks it.
    fn from(response: AgentResponse) -> Self {
        Self {
            response,
            misuse: None,
        }
    }
}

impl From<Decision> for Verdict {
    fn from(decision: Decision) -> Self {
        AgentResponse::decide(decision).into()
    }
}

impl Verdict {
    /// Let the request through.
    pub fn allow() -> Self {
        AgentResponse::allow().into()
    }

    /// Answer the client with `status` (200-599) instead of forwarding.
    pub fn block(status: u16) -> Self {
        Decision::block(status).into()
    }

    /// `block(403)`.
    pub fn deny() -> Self {
        Self::block(403)
    }

    /// Redirect the client to `url` with `status` (301, 302, 307 or 308).
    pub fn redirect(url: impl Into<String>, status: u16) -> Self {
        Decision::Redirect {
            url: url.into(),
            status,
        }
        .into()
    }

    /// Challenge the client (`challenge_type` such as `javascript`); it
    /// gets through once it has passed.
    pub fn challenge<K, V>(
        challenge_type: impl Into<String>,
        params: impl IntoIterator<Item = (K, V)>,
    ) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        Decision::Challenge {
            challenge_type: challenge_type.into(),
            params: params
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
        .into()
    }

    fn misuse(mut self, error: VerdictError) -> Self {
        self.misuse.get_or_insert(error);
        self
    }

    /// The body of a block answer.
    pub fn with_body(mut self, text: impl Into<String>) -> Self {
        match &mut self.response.decision {
            Decision::Block { body, .. } => {
                *body = Some(text.into());
                self
            }
            other => {
                let decision = other.name();
                self.misuse(VerdictError::NotABlock {
                    method: "with_body",
                    decision,
                })
            }
        }
    }

    /// A header of a block answer (the last value for a name wins).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        match &mut self.response.decision {
            Decision::Block { headers, .. } => {
                headers.insert(name.into(), value.into());
                self
            }
            other => {
                let decision = other.name();
                self.misuse(VerdictError::NotABlock {
                    method: "with_header",
                    decision,
                })
            }
        }
    }

    /// Append a value to a request header before it goes upstream.
    pub fn add_request_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.response.request_headers.push(HeaderOp::Add {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Replace every value of a request header.
    pub fn set_request_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.response.request_headers.push(HeaderOp::Set {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Remove a request header.
    pub fn remove_request_header(mut self, name: impl Into<String>) -> Self {
        self.response
            .request_headers
            .push(HeaderOp::Remove { name: name.into() });
        self
    }

    /// Append a value to a response header before it goes to the client.
    pub fn add_response_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.response.response_headers.push(HeaderOp::Add {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Replace every value of a response header.
    pub fn set_response_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.response.response_headers.push(HeaderOp::Set {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Remove a response header.
    pub fn remove_response_header(mut self, name: impl Into<String>) -> Self {
        self.response
            .response_headers
            .push(HeaderOp::Remove { name: name.into() });
        self
    }

    /// A key-value pair for the proxy's routing.
    pub fn routing_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.response
            .routing_metadata
            .insert(key.into(), value.into());
        self
    }

    fn audit(&mut self) -> &mut Audit {
        self.response.audit.get_or_insert_with(Audit::default)
    }

    /// A tag for the request's logs and metrics.
    pub fn audit_tag(mut self, tag: impl Into<String>) -> Self {
        self.audit().tags.push(tag.into());
        self
    }

    /// The id of a rule that matched.
    pub fn rule_id(mut self, id: impl Into<String>) -> Self {
        self.audit().rule_ids.push(id.into());
        self
    }

    /// How sure the agent is, 0 to 1.
    pub fn confidence(mut self, confidence: f64) -> Self {
        self.audit().confidence = Some(confidence);
        self
    }

    /// A machine-readable reason (`SQLI`, `IP_DENIED`, ...).
    pub fn reason_code(mut self, code: impl Into<String>) -> Self {
        self.audit().reason_codes.push(code.into());
        self
    }

    /// Any other audit field.
    pub fn custom(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.audit().custom.insert(key.into(), value.into());
        self
    }

    /// Replace the body chunk (or WebSocket frame payload) the event
    /// carried.
    pub fn replace_body(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.response.body_mutation = Some(BodyMutation {
            data: Some(data.into()),
        });
        self
    }

    /// Drop the body chunk (or WebSocket frame) the event carried.
    pub fn drop_chunk(mut self) -> Self {
        self.response.body_mutation = Some(BodyMutation {
            data: Some(Vec::new()),
        });
        self
    }

    /// The result of a `guardrail_inspect` check.
    pub fn guardrail(mut self, result: GuardrailResult) -> Self {
        self.response.guardrail = Some(result);
        self
    }

    /// Ask for a kernel push as given.
    pub fn kernel_push(mut self, push: KernelPush) -> Self {
        self.response.kernel_push = Some(push);
        self
    }

    /// Ask for the client to be dropped in XDP: by default its own address
    /// (/32 or /128) for the agent's `max-ttl-seconds`. Honoured only where
    /// the proxy offered kernel pushes in `configure`.
    pub fn kernel_deny(self) -> Self {
        self.kernel_push(KernelPush {
            action: KernelAction::Deny,
            ..KernelPush::default()
        })
    }

    /// Ask for the client's connections to be steered to the quarantine
    /// listener.
    pub fn kernel_watch(self) -> Self {
        self.kernel_push(KernelPush {
            action: KernelAction::Watch,
            ..KernelPush::default()
        })
    }

    fn with_push(mut self, method: &'static str, f: impl FnOnce(&mut KernelPush)) -> Self {
        match &mut self.response.kernel_push {
            Some(push) => {
                f(push);
                self
            }
            None => self.misuse(VerdictError::NoKernelPush { method }),
        }
    }

    /// The prefix of the kernel push: a CIDR containing the client.
    pub fn kernel_prefix(self, cidr: impl Into<String>) -> Self {
        let cidr = cidr.into();
        self.with_push("kernel_prefix", |p| p.prefix = Some(cidr))
    }

    /// How long the kernel entry lives; the proxy caps it at the agent's
    /// `max-ttl-seconds`.
    pub fn kernel_ttl_seconds(self, ttl: u64) -> Self {
        self.with_push("kernel_ttl_seconds", |p| p.ttl_seconds = Some(ttl))
    }

    /// Why, for the kernel entry's record.
    pub fn kernel_reason(self, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        self.with_push("kernel_reason", |p| p.reason = Some(reason))
    }

    /// The decision so far.
    pub fn decision(&self) -> &Decision {
        &self.response.decision
    }

    /// The answer as built so far, unchecked.
    pub fn response(&self) -> &AgentResponse {
        &self.response
    }

    /// Checks the answer and returns it: the protocol's own rules (block
    /// and redirect statuses, a redirect's url), header names and values
    /// the proxy could not apply, confidences outside 0-1, and a kernel
    /// push whose prefix is not a CIDR or whose TTL is 0.
    pub fn build(self) -> Result<AgentResponse, VerdictError> {
        if let Some(error) = self.misuse {
            return Err(error);
        }
        let response = self.response;
        response.validate().map_err(|e| VerdictError::Protocol {
            reason: match e {
                ProtocolError::Invalid { reason } => reason,
                other => other.to_string(),
            },
        })?;
        if let Decision::Block { headers, .. } = &response.decision {
            check_headers(headers.iter().map(|(n, v)| (n.as_str(), Some(v.as_str()))))?;
        }
        check_headers(
            response
                .request_headers
                .iter()
                .chain(&response.response_headers)
                .map(|op| match op {
                    HeaderOp::Set { name, value } | HeaderOp::Add { name, value } => {
                        (name.as_str(), Some(value.as_str()))
                    }
                    HeaderOp::Remove { name } => (name.as_str(), None),
                }),
        )?;
        if let Some(value) = response.audit.as_ref().and_then(|a| a.confidence) {
            check_confidence("audit", value)?;
        }
        if let Some(g) = &response.guardrail {
            check_confidence("guardrail", g.confidence)?;
        }
        if let Some(push) = &response.kernel_push {
            if let Some(prefix) = &push.prefix
                && prefix.parse::<ipnet::IpNet>().is_err()
            {
                return Err(VerdictError::KernelPrefix {
                    prefix: prefix.clone(),
                });
            }
            if push.ttl_seconds == Some(0) {
                return Err(VerdictError::KernelTtl);
            }
        }
        Ok(response)
    }
}

fn check_headers<'a>(
    headers: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<(), VerdictError> {
    for (name, value) in headers {
        if !valid_name(name.as_bytes()) {
            return Err(VerdictError::HeaderName {
                name: name.to_owned(),
            });
        }
        if let Some(value) = value
            && !valid_value(value.as_bytes())
        {
            return Err(VerdictError::HeaderValue {
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

/// What `http::HeaderName::from_bytes` accepts (an RFC 9110 token of at
/// most 65535 bytes), without building one: that allocates for any name
/// that is not all lowercase.
fn valid_name(name: &[u8]) -> bool {
    const SYMBOLS: &[u8] = b"!#$%&'*+-.^_`|~";
    !name.is_empty()
        && name.len() < 1 << 16
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || SYMBOLS.contains(b))
}

/// What `http::HeaderValue::from_bytes` accepts, without the copy.
fn valid_value(value: &[u8]) -> bool {
    value.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

fn check_confidence(what: &'static str, value: f64) -> Result<(), VerdictError> {
    // NaN fails the range check too; JSON could not carry it anyway.
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(VerdictError::Confidence { what, value })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn header_checks_agree_with_http() {
        let mut names: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        names.extend([
            b"X-Agent-Processed".to_vec(),
            b"x-ok".to_vec(),
            b"".to_vec(),
            b"bad name".to_vec(),
            vec![b'a'; 65535],
            vec![b'a'; 65536],
        ]);
        for name in &names {
            assert_eq!(
                valid_name(name),
                http::HeaderName::from_bytes(name).is_ok(),
                "{name:?}"
            );
        }
        let mut values: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b'a', b]).collect();
        values.extend([b"".to_vec(), "caf\u{e9}".as_bytes().to_vec()]);
        for value in &values {
            assert_eq!(
                valid_value(value),
                http::HeaderValue::from_bytes(value).is_ok(),
                "{value:?}"
            );
        }
    }

    fn json_of(v: Verdict) -> serde_json::Value {
        let response = v.build().unwrap();
        serde_json::from_slice(&response.to_json()).unwrap()
    }

    #[test]
    fn allow_is_the_seeds_plain_answer() {
        assert_eq!(
            json_of(Verdict::allow()),
            json!({"version": 1, "decision": "allow"})
        );
        assert_eq!(Verdict::default(), Verdict::allow());
    }

    #[test]
    fn block_carries_status_body_and_headers() {
        let v = Verdict::block(429)
            .with_body("slow down")
            .with_header("Retry-After", "5")
            .with_header("Retry-After", "6");
        assert_eq!(
            json_of(v),
            json!({"version": 1, "decision": {"block": {
                "status": 429, "body": "slow down", "headers": {"Retry-After": "6"}
            }}})
        );
        assert_eq!(Verdict::deny().decision(), &Decision::block(403));
    }

    #[test]
    fn redirect_and_challenge() {
        assert_eq!(
            json_of(Verdict::redirect("https://login.example/", 307)),
            json!({"version": 1, "decision": {"redirect": {"url": "https://login.example/", "status": 307}}})
        );
        assert_eq!(
            json_of(Verdict::challenge("javascript", [("difficulty", "12")])),
            json!({"version": 1, "decision": {"challenge": {
                "challenge_type": "javascript", "params": {"difficulty": "12"}
            }}})
        );
    }

    #[test]
    fn header_mutations_keep_their_order() {
        let v = Verdict::allow()
            .add_request_header("x-a", "1")
            .set_request_header("x-b", "2")
            .remove_request_header("x-c")
            .add_request_header("x-a", "3")
            .set_response_header("x-d", "4")
            .remove_response_header("server")
            .add_response_header("x-e", "5");
        let r = v.build().unwrap();
        assert_eq!(
            r.request_headers,
            vec![
                HeaderOp::Add {
                    name: "x-a".into(),
                    value: "1".into()
                },
                HeaderOp::Set {
                    name: "x-b".into(),
                    value: "2".into()
                },
                HeaderOp::Remove { name: "x-c".into() },
                HeaderOp::Add {
                    name: "x-a".into(),
                    value: "3".into()
                },
            ]
        );
        assert_eq!(
            r.response_headers,
            vec![
                HeaderOp::Set {
                    name: "x-d".into(),
                    value: "4".into()
                },
                HeaderOp::Remove {
                    name: "server".into()
                },
                HeaderOp::Add {
                    name: "x-e".into(),
                    value: "5".into()
                },
            ]
        );
    }

    #[test]
    fn audit_fields_accumulate() {
        let v = Verdict::deny()
            .audit_tag("sqli")
            .audit_tag("body")
            .rule_id("942100")
            .confidence(0.75)
            .reason_code("SQLI")
            .custom("score", 7)
            .custom("where", "args")
            .routing_metadata("shard", "2");
        assert_eq!(
            json_of(v),
            json!({
                "version": 1,
                "decision": {"block": {"status": 403}},
                "routing_metadata": {"shard": "2"},
                "audit": {
                    "tags": ["sqli", "body"],
                    "rule_ids": ["942100"],
                    "confidence": 0.75,
                    "reason_codes": ["SQLI"],
                    "custom": {"score": 7, "where": "args"}
                }
            })
        );
    }

    #[test]
    fn body_mutations_guardrail_and_kernel_push() {
        assert_eq!(
            json_of(Verdict::allow().replace_body(b"new".to_vec()))["body_mutation"],
            json!({"data": "bmV3"})
        );
        assert_eq!(
            json_of(Verdict::allow().drop_chunk())["body_mutation"],
            json!({"data": ""})
        );
        let g = GuardrailResult {
            detected: true,
            confidence: 0.9,
            detections: vec![],
        };
        assert_eq!(
            Verdict::allow()
                .guardrail(g.clone())
                .build()
                .unwrap()
                .guardrail,
            Some(g)
        );
        let v = Verdict::deny()
            .kernel_deny()
            .kernel_prefix("203.0.113.0/24")
            .kernel_ttl_seconds(60)
            .kernel_reason("scanner");
        assert_eq!(
            json_of(v)["kernel_push"],
            json!({"action": "deny", "prefix": "203.0.113.0/24", "ttl_seconds": 60, "reason": "scanner"})
        );
        assert_eq!(
            json_of(Verdict::allow().kernel_watch())["kernel_push"],
            json!({"action": "watch"})
        );
    }

    #[test]
    fn what_the_protocol_refuses_does_not_build() {
        for (v, why) in [
            (Verdict::block(199), "200-599"),
            (Verdict::block(600), "200-599"),
            (Verdict::redirect("/x", 303), "301, 302, 307 or 308"),
            (Verdict::redirect("", 302), "without a url"),
        ] {
            let err = v.build().unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
        assert!(Verdict::block(200).build().is_ok());
        assert!(Verdict::block(599).build().is_ok());
        for status in [301, 302, 307, 308] {
            assert!(Verdict::redirect("/x", status).build().is_ok());
        }
        let wrong_version = AgentResponse {
            version: 2,
            ..AgentResponse::allow()
        };
        assert!(matches!(
            Verdict::from(wrong_version).build(),
            Err(VerdictError::Protocol { .. })
        ));
    }

    #[test]
    fn misuse_is_reported_by_build() {
        assert_eq!(
            Verdict::allow().with_body("x").build(),
            Err(VerdictError::NotABlock {
                method: "with_body",
                decision: "allow"
            })
        );
        assert_eq!(
            Verdict::redirect("/x", 302)
                .with_header("a", "b")
                .build()
                .unwrap_err(),
            VerdictError::NotABlock {
                method: "with_header",
                decision: "redirect"
            }
        );
        assert_eq!(
            Verdict::deny().kernel_ttl_seconds(5).build(),
            Err(VerdictError::NoKernelPush {
                method: "kernel_ttl_seconds"
            })
        );
        // The first mistake is the one reported.
        assert_eq!(
            Verdict::allow()
                .kernel_reason("x")
                .with_body("y")
                .build()
                .unwrap_err(),
            VerdictError::NoKernelPush {
                method: "kernel_reason"
            }
        );
    }

    #[test]
    fn unusable_fields_do_not_build() {
        assert!(matches!(
            Verdict::allow().add_request_header("bad name", "v").build(),
            Err(VerdictError::HeaderName { .. })
        ));
        assert!(matches!(
            Verdict::allow().set_response_header("x", "a\nb").build(),
            Err(VerdictError::HeaderValue { .. })
        ));
        assert!(matches!(
            Verdict::allow().remove_request_header("").build(),
            Err(VerdictError::HeaderName { .. })
        ));
        assert!(matches!(
            Verdict::deny().with_header("x:y", "v").build(),
            Err(VerdictError::HeaderName { .. })
        ));
        for bad in [-0.1, 1.5, f64::NAN] {
            assert!(matches!(
                Verdict::allow().confidence(bad).build(),
                Err(VerdictError::Confidence { what: "audit", .. })
            ));
        }
        assert!(matches!(
            Verdict::allow()
                .guardrail(GuardrailResult {
                    detected: false,
                    confidence: 2.0,
                    detections: vec![]
                })
                .build(),
            Err(VerdictError::Confidence {
                what: "guardrail",
                ..
            })
        ));
        assert_eq!(
            Verdict::deny()
                .kernel_deny()
                .kernel_prefix("not-a-net")
                .build(),
            Err(VerdictError::KernelPrefix {
                prefix: "not-a-net".into()
            })
        );
        assert_eq!(
            Verdict::deny().kernel_deny().kernel_ttl_seconds(0).build(),
            Err(VerdictError::KernelTtl)
        );
    }
}
