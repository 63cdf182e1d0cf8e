//! Writing and scanning JSON strings eight bytes at a time.
//!
//! Nearly every string the proxy and its agents exchange (header names and
//! values, paths, metadata) needs no escaping. serde_json still looks each
//! byte up in its escape table; checking a word at a time and copying the
//! string whole is several times cheaper, and what serde_json would write
//! for the rest is exactly what it writes, since those go through it.

/// Where the first byte JSON must escape in a string (`"`, `\` or a
/// control character) is in `bytes`, checked eight bytes at a time.
#[inline]
pub fn first_special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // The high bit of each byte below `n` (the first such byte exactly; a
    // borrow may flag bytes after it).
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let hit = below(w ^ (ONES * u64::from(b'"')), 1)
            | below(w ^ (ONES * u64::from(b'\\')), 1)
            | below(w, 0x20);
        if hit != 0 {
            // Little-endian: the lowest set bit is the first byte.
            return Some(at + (hit.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| at + i)
}

/// Whether JSON needs anything in `bytes` escaped.
#[inline]
pub fn needs_escape(bytes: &[u8]) -> bool {
    first_special(bytes).is_some()
}

/// Appends `s` as a JSON string, the same bytes serde_json writes.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Writes `response` as serde_json would, directly when it is in the
/// common shape (an `allow` with header operations and nothing else), which
/// costs a fraction of serde's generic path; anything else through serde.
pub fn write_response(
    out: &mut Vec<u8>,
    response: &crate::AgentResponse,
) -> serde_json::Result<()> {
    use crate::{Decision, HeaderOp};
    let common = matches!(response.decision, Decision::Allow)
        && response.routing_metadata.is_empty()
        && response.audit.is_none()
        && response.body_mutation.is_none()
        && response.guardrail.is_none()
        && response.kernel_push.is_none()
        && response.extensions.is_empty();
    if !common {
        return serde_json::to_writer(out, response);
    }
    let mut int = itoa::Buffer::new();
    out.extend_from_slice(b"{\"version\":");
    out.extend_from_slice(int.format(response.version).as_bytes());
    if let Some(id) = response.id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(int.format(id).as_bytes());
    }
    out.extend_from_slice(b",\"decision\":\"allow\"");
    for (key, ops) in [
        (&b",\"request_headers\":["[..], &response.request_headers),
        (&b",\"response_headers\":["[..], &response.response_headers),
    ] {
        if ops.is_empty() {
            continue;
        }
        out.extend_from_slice(key);
        for (i, op) in ops.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let (kind, name, value): (&[u8], _, _) = match op {
                HeaderOp::Set { name, value } => (b"{\"set\":{\"name\":", name, Some(value)),
                HeaderOp::Add { name, value } => (b"{\"add\":{\"name\":", name, Some(value)),
                HeaderOp::Remove { name } => (b"{\"remove\":{\"name\":", name, None),
            };
            out.extend_from_slice(kind);
            write_str(out, name);
            if let Some(value) = value {
                out.extend_from_slice(b",\"value\":");
                write_str(out, value);
            }
            out.extend_from_slice(b"}}");
        }
        out.push(b']');
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_special_finds_the_first_byte_serde_escapes() {
        let reference = |b: &[u8]| b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
        let interesting = [
            0, 1, 0x1f, 0x20, 0x21, b'"', 0x23, b'\\', 0x7f, 0x80, 0xa2, 0xdc, 0xff,
        ];
        // Every position of every interesting byte in texts of every length
        // up to 24, over a background of each harmless byte too.
        for len in 0..24 {
            for &background in &[b'a', 0x80, 0xff, 0x21, 0x23] {
                for at in 0..len {
                    for &stop in &interesting {
                        let mut text = vec![background; len];
                        text[at] = stop;
                        assert_eq!(first_special(&text), reference(&text), "{text:?}");
                        if at + 1 < len {
                            text[at + 1] = b'"';
                            assert_eq!(first_special(&text), reference(&text), "{text:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn answers_are_written_as_serde_json_writes_them() {
        use crate::{AgentResponse, Audit, Decision, HeaderOp};
        let op = |kind: usize, name: &str, value: &str| match kind {
            0 => HeaderOp::Set {
                name: name.into(),
                value: value.into(),
            },
            1 => HeaderOp::Add {
                name: name.into(),
                value: value.into(),
            },
            _ => HeaderOp::Remove { name: name.into() },
        };
        let answers = [
            AgentResponse::allow(),
            AgentResponse {
                id: Some(u64::MAX),
                request_headers: vec![op(0, "X-Agent-Processed", "true")],
                ..AgentResponse::allow()
            },
            AgentResponse {
                version: 7,
                id: Some(0),
                request_headers: vec![op(1, "a\"b", "é\n"), op(2, "c", "")],
                response_headers: vec![op(0, "", "\u{1}"), op(2, "x", "")],
                ..AgentResponse::allow()
            },
            AgentResponse {
                response_headers: vec![op(1, "k", "v")],
                ..AgentResponse::decide(Decision::block(403))
            },
            AgentResponse {
                audit: Some(Audit {
                    tags: vec!["t".into()],
                    ..Audit::default()
                }),
                ..AgentResponse::allow()
            },
            AgentResponse {
                extensions: vec!["multiplex".into()],
                ..AgentResponse::allow()
            },
        ];
        for answer in answers {
            let mut out = Vec::new();
            write_response(&mut out, &answer).unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(serde_json::to_vec(&answer).unwrap()).unwrap()
            );
        }
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "plain text / with: punctuation ~ and \u{7f}",
            "quote \" and backslash \\",
            "control \u{0}\u{1f} tab\t",
            "non-ASCII é ☃ 𝄞",
            "eight by",
            "sixteen bytes ok",
            "a quote at sixteen byte\"",
            "control in the second word:\u{1b}",
            "\u{80}\u{ff}\u{1f}",
        ] {
            let mut out = Vec::new();
            write_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }
}
