//! Direct readers for the messages each side gets most: a
//! `request_headers` envelope as the proxy writes it, for an agent, and an
//! `allow` answer with header operations, for the proxy.
//!
//! serde_json spends most of its time per string on its general machinery
//! (visitors, escape handling, the scratch buffer); a `request_headers`
//! event is forty-odd short strings, so that machinery is most of an
//! agent's work per call. This reader handles the common shape only —
//! the envelope's and the event's known fields, strings without escapes,
//! plain integers — and reads it straight into a recycled event
//! ([`crate::recycle`]). Anything else (an escape, an unknown or repeated
//! field, another event type, a number in another form, any syntax error)
//! makes it give up, and the caller parses the text with serde instead,
//! which either gives the same result or says what is wrong. So this
//! reader only ever returns what serde would; the tests check that on
//! every text they have and on every mutation of them.

use crate::{
    AgentRequest, AgentResponse, Event, HeaderOp, Headers, RequestHeadersEvent, RequestMetadata,
    json::first_special,
};

/// `Some` when `text` is a `request_headers` envelope in the common shape;
/// `None` leaves `recycled` as usable as before for the fallback.
pub(crate) fn request(
    text: &str,
    recycled: &mut Option<RequestHeadersEvent>,
) -> Option<AgentRequest> {
    let mut event = recycled.take().unwrap_or_default();
    let mut cur = Cursor {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    match envelope(&mut cur, &mut event) {
        Some((version, id)) if cur.end() => Some(AgentRequest {
            version,
            id,
            event: Event::RequestHeaders(event),
        }),
        _ => {
            *recycled = Some(event);
            None
        }
    }
}

struct Cursor<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.at += 1)
    }

    /// Whether only whitespace is left.
    fn end(&mut self) -> bool {
        self.skip_ws();
        self.at == self.bytes.len()
    }

    /// A string without escapes or control characters (which serde would
    /// refuse or decode).
    #[inline]
    fn str(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let rest = self.bytes.get(start..)?;
        let len = first_special(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        // Both ends are ASCII quotes, so char boundaries.
        self.text.get(start..start + len)
    }

    /// A non-negative integer up to `max`, written as JSON writes one
    /// (no sign, fraction, exponent or leading zero).
    fn uint(&mut self, max: u64) -> Option<u64> {
        self.skip_ws();
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.bytes.get(self.at) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || (digits > 1 && self.bytes[start] == b'0') || n > max {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.bytes.get(self.at) {
            return None;
        }
        Some(n)
    }

    fn null(&mut self) -> bool {
        self.skip_ws();
        if self.bytes[self.at..].starts_with(b"null") {
            self.at += 4;
            true
        } else {
            false
        }
    }

    /// Calls `field` for each key of an object, the cursor on its value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.str()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

fn set(to: &mut String, s: &str) {
    to.clear();
    to.push_str(s);
}

fn set_opt(to: &mut Option<String>, cur: &mut Cursor) -> Option<()> {
    if cur.null() {
        *to = None;
    } else {
        set(to.get_or_insert_with(String::new), cur.str()?);
    }
    Some(())
}

/// Marks field `i` seen; `None` (give up) if it was.
fn first(seen: &mut u32, i: u32) -> Option<()> {
    let bit = 1 << i;
    (*seen & bit == 0).then(|| *seen |= bit)
}

fn envelope(cur: &mut Cursor, event: &mut RequestHeadersEvent) -> Option<(u32, Option<u64>)> {
    let (mut version, mut id, mut seen) = (0, None, 0);
    cur.object(|cur, key| match key {
        "version" => {
            first(&mut seen, 0)?;
            version = cur.uint(u64::from(u32::MAX))? as u32;
            Some(())
        }
        // Before the payload only: the other order is serde's to read.
        "event_type" if seen & 4 == 0 => {
            first(&mut seen, 1)?;
            (cur.str()? == "request_headers").then_some(())
        }
        "payload" if seen & 2 != 0 => {
            first(&mut seen, 2)?;
            payload(cur, event)
        }
        "id" => {
            first(&mut seen, 3)?;
            id = if cur.null() {
                None
            } else {
                Some(cur.uint(u64::MAX)?)
            };
            Some(())
        }
        _ => None,
    })?;
    (seen & 7 == 7).then_some((version, id))
}

fn payload(cur: &mut Cursor, event: &mut RequestHeadersEvent) -> Option<()> {
    let mut seen = 0;
    cur.object(|cur, key| match key {
        "metadata" => {
            first(&mut seen, 0)?;
            metadata(cur, &mut event.metadata)
        }
        "method" => {
            first(&mut seen, 1)?;
            set(&mut event.method, cur.str()?);
            Some(())
        }
        "uri" => {
            first(&mut seen, 2)?;
            set(&mut event.uri, cur.str()?);
            Some(())
        }
        "headers" => {
            first(&mut seen, 3)?;
            headers(cur, &mut event.headers)
        }
        _ => None,
    })?;
    if seen & 7 != 7 {
        return None;
    }
    if seen & 8 == 0 {
        event.headers.clear();
    }
    Some(())
}

fn metadata(cur: &mut Cursor, m: &mut RequestMetadata) -> Option<()> {
    let mut seen = 0;
    cur.object(|cur, key| {
        let i = match key {
            "correlation_id" => 0,
            "request_id" => 1,
            "client_ip" => 2,
            "client_port" => 3,
            "server_name" => 4,
            "protocol" => 5,
            "tls_version" => 6,
            "route_id" => 7,
            "upstream_id" => 8,
            "listener" => 9,
            "timestamp" => 10,
            _ => return None,
        };
        first(&mut seen, i)?;
        match i {
            0 => set(&mut m.correlation_id, cur.str()?),
            1 => set(&mut m.request_id, cur.str()?),
            2 => set(&mut m.client_ip, cur.str()?),
            3 => m.client_port = cur.uint(u64::from(u16::MAX))? as u16,
            4 => set_opt(&mut m.server_name, cur)?,
            5 => set(&mut m.protocol, cur.str()?),
            6 => set_opt(&mut m.tls_version, cur)?,
            7 => set_opt(&mut m.route_id, cur)?,
            8 => set_opt(&mut m.upstream_id, cur)?,
            9 => set_opt(&mut m.listener, cur)?,
            _ => set(&mut m.timestamp, cur.str()?),
        }
        Some(())
    })?;
    if seen & 7 != 7 {
        return None;
    }
    let absent = |i: u32| seen & (1 << i) == 0;
    if absent(3) {
        m.client_port = 0;
    }
    if absent(4) {
        m.server_name = None;
    }
    if absent(5) {
        m.protocol.clear();
    }
    if absent(6) {
        m.tls_version = None;
    }
    if absent(7) {
        m.route_id = None;
    }
    if absent(8) {
        m.upstream_id = None;
    }
    if absent(9) {
        m.listener = None;
    }
    if absent(10) {
        m.timestamp.clear();
    }
    Some(())
}

/// Most header names a request may have for this reader; more is
/// serde's.
const MAX_NAMES: usize = 64;

fn headers(cur: &mut Cursor, headers: &mut Headers) -> Option<()> {
    let mut seen: [&str; MAX_NAMES] = [""; MAX_NAMES];
    let mut n = 0;
    // Names come in order, as the map holds them: walk both together
    // rather than look each name up.
    let mut old = headers.iter_mut().peekable();
    let mut added: Vec<(String, Vec<String>)> = Vec::new();
    let mut stale = false;
    cur.object(|cur, key| {
        // Strictly increasing names (as a BTreeMap writes them) cannot
        // repeat; any other order is serde's.
        if n == MAX_NAMES || (n > 0 && seen[n - 1] >= key) {
            return None;
        }
        seen[n] = key;
        n += 1;
        while old.next_if(|(k, _)| k.as_str() < key).is_some() {
            stale = true;
        }
        match old.next_if(|(k, _)| k.as_str() == key) {
            Some((_, values)) => strings(cur, values),
            None => {
                let mut values = Vec::new();
                strings(cur, &mut values)?;
                added.push((key.to_owned(), values));
                Some(())
            }
        }
    })?;
    stale |= old.next().is_some();
    headers.extend(added);
    // An earlier event's name that is not in this one.
    if stale {
        let seen = &seen[..n];
        headers.retain(|k, _| seen.binary_search(&k.as_str()).is_ok());
    }
    Some(())
}

fn strings(cur: &mut Cursor, values: &mut Vec<String>) -> Option<()> {
    cur.eat(b'[')?;
    let mut n = 0;
    if cur.eat(b']').is_none() {
        loop {
            let s = cur.str()?;
            match values.get_mut(n) {
                Some(v) => set(v, s),
                None => values.push(s.to_owned()),
            }
            n += 1;
            match cur.peek()? {
                b',' => cur.at += 1,
                b']' => {
                    cur.at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    values.truncate(n);
    Some(())
}

/// `Some` when `text` is an answer in the common shape: `version`, `id`,
/// `decision` as the string `"allow"`, and `request_headers` and
/// `response_headers` of plain `set`, `add` and `remove` operations. The
/// answer is not validated (as serde's parse does not validate it).
pub(crate) fn response(text: &str) -> Option<AgentResponse> {
    let mut cur = Cursor {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    let mut answer = AgentResponse::default();
    let mut seen = 0;
    cur.object(|cur, key| match key {
        "version" => {
            first(&mut seen, 0)?;
            answer.version = cur.uint(u64::from(u32::MAX))? as u32;
            Some(())
        }
        "id" => {
            first(&mut seen, 1)?;
            answer.id = if cur.null() {
                None
            } else {
                Some(cur.uint(u64::MAX)?)
            };
            Some(())
        }
        "decision" => {
            first(&mut seen, 2)?;
            (cur.str()? == "allow").then_some(())
        }
        "request_headers" => {
            first(&mut seen, 3)?;
            header_ops(cur, &mut answer.request_headers)
        }
        "response_headers" => {
            first(&mut seen, 4)?;
            header_ops(cur, &mut answer.response_headers)
        }
        _ => None,
    })?;
    // serde requires the version.
    (seen & 1 == 1 && cur.end()).then_some(answer)
}

fn header_ops(cur: &mut Cursor, ops: &mut Vec<HeaderOp>) -> Option<()> {
    cur.eat(b'[')?;
    if cur.eat(b']').is_some() {
        return Some(());
    }
    loop {
        ops.push(header_op(cur)?);
        match cur.peek()? {
            b',' => cur.at += 1,
            b']' => {
                cur.at += 1;
                return Some(());
            }
            _ => return None,
        }
    }
}

/// `{"set": {"name": ..., "value": ...}}` and its kin, each field once.
fn header_op(cur: &mut Cursor) -> Option<HeaderOp> {
    let mut op = None;
    cur.object(|cur, kind| {
        if op.is_some() {
            return None;
        }
        let with_value = match kind {
            "set" | "add" => true,
            "remove" => false,
            _ => return None,
        };
        let (mut name, mut value, mut seen) = ("", "", 0);
        cur.object(|cur, field| match field {
            "name" => {
                first(&mut seen, 0)?;
                name = cur.str()?;
                Some(())
            }
            "value" if with_value => {
                first(&mut seen, 1)?;
                value = cur.str()?;
                Some(())
            }
            _ => None,
        })?;
        let (name, value) = (name.to_owned(), value.to_owned());
        op = Some(match kind {
            "set" if seen == 3 => HeaderOp::Set { name, value },
            "add" if seen == 3 => HeaderOp::Add { name, value },
            "remove" if seen == 1 => HeaderOp::Remove { name },
            _ => return None,
        });
        Some(())
    })?;
    op
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers in the direct reader's shape.
    const COMMON: [&str; 5] = [
        r#"{"version":1,"id":123456,"decision":"allow","request_headers":[{"set":{"name":"X-Agent-Processed","value":"true"}}]}"#,
        r#"{"version":1}"#,
        r#"{ "version" : 1 , "decision" : "allow" , "id" : null }"#,
        r#"{"version":1,"request_headers":[],"response_headers":[{"add":{"name":"a","value":"1"}},{"remove":{"name":"b"}},{"set":{"value":"v","name":"c"}}]}"#,
        r#"{"id":0,"version":2,"response_headers":[{"remove":{"name":""}}]}"#,
    ];

    /// Answers serde must read: other decisions, escapes, unknown fields.
    const OTHERS: [&str; 6] = [
        r#"{"version":1,"decision":{"block":{"status":403}}}"#,
        r#"{"version":1,"decision":"block"}"#,
        r#"{"version":1,"request_headers":[{"set":{"name":"a\"b","value":"1"}}]}"#,
        r#"{"version":1,"audit":{"tags":["t"]}}"#,
        r#"{"version":1,"request_headers":[{"set":{"name":"a","value":"1","extra":2}}]}"#,
        r#"{"decision":"allow"}"#,
    ];

    fn serde(text: &str) -> Option<AgentResponse> {
        serde_json::from_str(text).ok()
    }

    #[test]
    fn the_common_answers_are_read_directly_as_serde_reads_them() {
        for text in COMMON {
            let fast = response(text).unwrap_or_else(|| panic!("not read directly: {text}"));
            assert_eq!(Some(fast), serde(text), "{text}");
        }
        for text in OTHERS {
            assert_eq!(response(text), None, "{text}");
        }
    }

    /// Whatever the direct reader accepts, serde reads the same: checked
    /// on every truncation and on many one-byte changes of every answer.
    #[test]
    fn the_direct_reader_never_disagrees_with_serde() {
        let check = |text: &str| {
            if let Some(fast) = response(text) {
                assert_eq!(Some(fast), serde(text), "{text:?}");
            }
        };
        for text in COMMON.iter().chain(&OTHERS) {
            for end in 0..text.len() {
                check(&text[..end]);
            }
            let bytes = text.as_bytes();
            for at in 0..bytes.len() {
                for b in *b"\"\\,:{}[]0 9-.eanx\x01" {
                    let mut changed = bytes.to_vec();
                    changed[at] = b;
                    if let Ok(changed) = std::str::from_utf8(&changed) {
                        check(changed);
                    }
                    let mut inserted = bytes.to_vec();
                    inserted.insert(at, b);
                    if let Ok(inserted) = std::str::from_utf8(&inserted) {
                        check(inserted);
                    }
                }
            }
        }
    }
}
