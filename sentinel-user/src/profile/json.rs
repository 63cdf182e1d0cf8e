//! JSON objects written member by member straight into a byte buffer.
//!
//! Records are made thousands of times a second; building a
//! `serde_json::Value` tree for each, only to serialize it and drop it,
//! cost more than everything else the store does. Values are still
//! serialized by serde_json (strings escaped, floats formatted as it
//! does), so the output is the same JSON, without the tree.

use serde::Serialize;

/// One JSON object being written into `out`: `{` on open, `}` on
/// [`close`](Self::close).
pub struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> JsonObject<'a> {
    pub fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    /// Goes on with an object left open at the end of `out` (its `}` not
    /// written yet) that has members already.
    pub fn resume(out: &'a mut Vec<u8>) -> Self {
        Self { out, empty: false }
    }

    /// Writes `"key":` (after a comma unless first) and returns the buffer
    /// for the value. Keys are written as they are: they must need no
    /// escaping, which holds for the record's own names and for HTTP
    /// header names (tokens, which exclude `"`, `\\` and controls), the
    /// only keys records are written with.
    pub fn key(&mut self, key: &str) -> &mut Vec<u8> {
        debug_assert!(
            !sentinel_agent_protocol::json::needs_escape(key.as_bytes()),
            "key {key:?} needs escaping"
        );
        let out = &mut *self.out;
        out.reserve(key.len() + 4);
        if !self.empty {
            out.push(b',');
        }
        self.empty = false;
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        out
    }

    pub fn str(&mut self, key: &str, value: &str) {
        string(self.key(key), value);
    }

    /// A string, or `null`.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.str(key, value),
            None => self.key(key).extend_from_slice(b"null"),
        }
    }

    /// Any serializable value. Values whose serialization can fail (maps
    /// with non-string keys) are not written with this.
    pub fn value<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        let out = self.key(key);
        let at = out.len();
        if serde_json::to_writer(&mut *out, value).is_err() {
            out.truncate(at);
            out.extend_from_slice(b"null");
        }
    }

    /// A value already serialized.
    pub fn raw(&mut self, key: &str, json: &[u8]) {
        self.key(key).extend_from_slice(json);
    }

    /// Members already serialized (`"a":1,"b":2`), appended as they are.
    pub fn members(&mut self, json: &[u8]) {
        if json.is_empty() {
            return;
        }
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.extend_from_slice(json);
    }

    /// A nested object under `key`.
    pub fn object(&mut self, key: &str) -> JsonObject<'_> {
        JsonObject::open(self.key(key))
    }

    pub fn close(self) {
        self.out.push(b'}');
    }
}

/// `value` as a JSON string, as serde_json writes it (strings that need
/// no escaping, nearly all of a record, are copied whole).
pub fn string(out: &mut Vec<u8>, value: &str) {
    sentinel_agent_protocol::json::write_str(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn writes_the_json_serde_json_would() {
        let mut out = Vec::new();
        let mut o = JsonObject::open(&mut out);
        o.str("a-b_2", "line\nbreak \u{1}");
        o.opt_str("none", None);
        o.value("n", &1.5f64);
        o.raw("raw", b"[1,2]");
        let mut inner = o.object("inner");
        inner.members(b"\"x\":true");
        inner.value("y", &[1, 2]);
        inner.close();
        o.members(b"");
        let empty = o.object("empty");
        empty.close();
        o.close();
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            parsed,
            json!({
                "a-b_2": "line\nbreak \u{1}",
                "none": null,
                "n": 1.5,
                "raw": [1, 2],
                "inner": {"x": true, "y": [1, 2]},
                "empty": {},
            })
        );
    }
}
