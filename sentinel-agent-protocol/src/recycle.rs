//! Reading a `request_headers` payload into the allocations of an earlier
//! one.
//!
//! An agent reads the same shape of event many times a second: the same
//! metadata fields, mostly the same header names, values of about the same
//! lengths. Parsed from scratch, each event is some forty allocations (and
//! as many frees once it is answered), which is most of what an agent does
//! per call. Read into the event of the call before, each string is
//! overwritten in its own buffer and each header keeps its name and value
//! vector, so a steady stream of requests allocates next to nothing.
//!
//! The result is exactly what the derived `Deserialize` gives for the same
//! text (the tests compare the two): the same required fields, defaults for
//! absent ones, unknown fields ignored, the last of two equal header names
//! winning, the same errors for duplicate fields. Anything the fast path
//! does not expect (a payload written as a JSON array) goes to the derived
//! impl.

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor, value},
};

use crate::{Headers, RequestHeadersEvent, RequestMetadata};

/// Reads a `request_headers` payload into `event`, reusing what it holds.
pub(crate) struct EventInPlace<'a>(pub &'a mut RequestHeadersEvent);

/// A string (`visit_borrowed_str` when the input allows it) or an owned
/// one, for a header name that need not be kept.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v))
            }
        }
        d.deserialize_str(V)
    }
}

/// A string into an existing buffer.
struct StrInPlace<'a>(&'a mut String);

impl<'de> DeserializeSeed<'de> for StrInPlace<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_string(self)
    }
}

impl<'de> Visitor<'de> for StrInPlace<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.clear();
        self.0.push_str(v);
        Ok(())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        *self.0 = v;
        Ok(())
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<(), E> {
        match std::str::from_utf8(v) {
            Ok(s) => self.visit_str(s),
            Err(_) => Err(E::invalid_value(de::Unexpected::Bytes(v), &self)),
        }
    }
}

/// An optional string into an existing one.
struct OptStrInPlace<'a>(&'a mut Option<String>);

impl<'de> DeserializeSeed<'de> for OptStrInPlace<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptStrInPlace<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("option")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        *self.0 = None;
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        *self.0 = None;
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let s = self.0.get_or_insert_with(String::new);
        StrInPlace(s).deserialize(d)
    }
}

/// A list of strings into an existing vector.
struct StringsInPlace<'a>(&'a mut Vec<String>);

impl<'de> DeserializeSeed<'de> for StringsInPlace<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for StringsInPlace<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let v = self.0;
        let mut n = 0;
        loop {
            if n == v.len() {
                let mut s = String::new();
                if seq.next_element_seed(StrInPlace(&mut s))?.is_none() {
                    break;
                }
                v.push(s);
            } else if seq.next_element_seed(StrInPlace(&mut v[n]))?.is_none() {
                break;
            }
            n += 1;
        }
        v.truncate(n);
        Ok(())
    }
}

/// The header map into an existing one: a name already there keeps its
/// key and its vector; names not in this event go.
struct HeadersInPlace<'a>(&'a mut Headers);

impl<'de> DeserializeSeed<'de> for HeadersInPlace<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeadersInPlace<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let headers = self.0;
        let mut seen: Vec<Key<'de>> = Vec::with_capacity(headers.len().max(8));
        // Names in strictly increasing order (as a BTreeMap writes them)
        // cannot repeat; otherwise the last of equal names wins, as in
        // `BTreeMap::insert`.
        let mut ordered = true;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if let Some(last) = seen.last()
                && last.as_str() >= key.as_str()
            {
                ordered = false;
            }
            match headers.get_mut(key.as_str()) {
                Some(values) => map.next_value_seed(StringsInPlace(values))?,
                None => {
                    let mut values = Vec::new();
                    map.next_value_seed(StringsInPlace(&mut values))?;
                    headers.insert(key.as_str().to_owned(), values);
                }
            }
            seen.push(key);
        }
        // Every seen name is in the map: it holds more exactly when some
        // earlier event's name was not seen this time.
        if !ordered || headers.len() > seen.len() {
            headers.retain(|k, _| seen.iter().any(|s| s.as_str() == k));
        }
        Ok(())
    }
}

/// Whether a field was seen, for the derived impl's missing/duplicate
/// errors.
fn once<E: de::Error>(seen: &mut bool, name: &'static str) -> Result<(), E> {
    if std::mem::replace(seen, true) {
        return Err(E::duplicate_field(name));
    }
    Ok(())
}

struct MetadataInPlace<'a>(&'a mut RequestMetadata);

impl<'de> DeserializeSeed<'de> for MetadataInPlace<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_struct("RequestMetadata", METADATA_FIELDS, self)
    }
}

const METADATA_FIELDS: &[&str] = &[
    "correlation_id",
    "request_id",
    "client_ip",
    "client_port",
    "server_name",
    "protocol",
    "tls_version",
    "route_id",
    "upstream_id",
    "listener",
    "timestamp",
];

impl<'de> Visitor<'de> for MetadataInPlace<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("struct RequestMetadata")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        *self.0 = RequestMetadata::deserialize(value::SeqAccessDeserializer::new(seq))?;
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let m = self.0;
        let mut seen = [false; 11];
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let Some(i) = METADATA_FIELDS.iter().position(|f| *f == key.as_str()) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            once(&mut seen[i], METADATA_FIELDS[i])?;
            match i {
                0 => map.next_value_seed(StrInPlace(&mut m.correlation_id))?,
                1 => map.next_value_seed(StrInPlace(&mut m.request_id))?,
                2 => map.next_value_seed(StrInPlace(&mut m.client_ip))?,
                3 => m.client_port = map.next_value()?,
                4 => map.next_value_seed(OptStrInPlace(&mut m.server_name))?,
                5 => map.next_value_seed(StrInPlace(&mut m.protocol))?,
                6 => map.next_value_seed(OptStrInPlace(&mut m.tls_version))?,
                7 => map.next_value_seed(OptStrInPlace(&mut m.route_id))?,
                8 => map.next_value_seed(OptStrInPlace(&mut m.upstream_id))?,
                9 => map.next_value_seed(OptStrInPlace(&mut m.listener))?,
                _ => map.next_value_seed(StrInPlace(&mut m.timestamp))?,
            }
        }
        for (i, name) in METADATA_FIELDS.iter().enumerate().take(3) {
            if !seen[i] {
                return Err(de::Error::missing_field(name));
            }
        }
        // Absent optional fields take their defaults, whatever the earlier
        // event had.
        if !seen[3] {
            m.client_port = 0;
        }
        if !seen[4] {
            m.server_name = None;
        }
        if !seen[5] {
            m.protocol.clear();
        }
        if !seen[6] {
            m.tls_version = None;
        }
        if !seen[7] {
            m.route_id = None;
        }
        if !seen[8] {
            m.upstream_id = None;
        }
        if !seen[9] {
            m.listener = None;
        }
        if !seen[10] {
            m.timestamp.clear();
        }
        Ok(())
    }
}

const EVENT_FIELDS: &[&str] = &["metadata", "method", "uri", "headers"];

impl<'de> DeserializeSeed<'de> for EventInPlace<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_struct("RequestHeadersEvent", EVENT_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for EventInPlace<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("struct RequestHeadersEvent")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        *self.0 = RequestHeadersEvent::deserialize(value::SeqAccessDeserializer::new(seq))?;
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let e = self.0;
        let mut seen = [false; 4];
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let Some(i) = EVENT_FIELDS.iter().position(|f| *f == key.as_str()) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            once(&mut seen[i], EVENT_FIELDS[i])?;
            match i {
                0 => map.next_value_seed(MetadataInPlace(&mut e.metadata))?,
                1 => map.next_value_seed(StrInPlace(&mut e.method))?,
                2 => map.next_value_seed(StrInPlace(&mut e.uri))?,
                _ => map.next_value_seed(HeadersInPlace(&mut e.headers))?,
            }
        }
        for (i, name) in EVENT_FIELDS.iter().enumerate().take(3) {
            if !seen[i] {
                return Err(de::Error::missing_field(name));
            }
        }
        if !seen[3] {
            e.headers.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{AgentRequest, Event, RequestHeadersEvent};

    fn full() -> String {
        r#"{"version":1,"event_type":"request_headers","payload":{
            "metadata":{"correlation_id":"c1","request_id":"r1","client_ip":"192.0.2.1",
              "client_port":443,"server_name":"a.test","protocol":"HTTP/2","tls_version":"TLSv1.3",
              "route_id":"api","upstream_id":"backend","listener":"https","timestamp":"2026-12-01T00:00:00.000Z"},
            "method":"POST","uri":"/api?x=1",
            "headers":{"accept":["a","b"],"host":["a.test"],"x-z":["1","2","3"]}},"id":7}"#
            .to_owned()
    }

    /// Each text, parsed after each other one into its event, gives what
    /// the derived impl gives, or fails where it fails.
    #[test]
    fn reading_into_an_earlier_event_changes_nothing() {
        let texts = [
            full(),
            // The seed's example: optional fields absent.
            r#"{"version":1,"event_type":"request_headers","payload":{
                "metadata":{"correlation_id":"c2","request_id":"r2","client_ip":"10.0.0.1"},
                "method":"GET","uri":"/"}}"#
                .to_owned(),
            // Fewer, other and more header names; values shorter and longer.
            r#"{"version":1,"event_type":"request_headers","payload":{"headers":{"accept":["xyzxyzxyz"],"b":[],"host":["h"]},
                "metadata":{"client_ip":"::1","request_id":"","correlation_id":"c3","server_name":null,"unknown":{"a":[1]}},
                "uri":"/long/path/with/more/bytes","method":"DELETE","extra":true}}"#
                .to_owned(),
            // Names out of order and repeated: the last wins.
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},
                "method":"GET","uri":"/","headers":{"x-z":["1"],"accept":["2"],"x-z":["3","4"]}}}"#
                .to_owned(),
            // Escapes in names and values.
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c\u0031","request_id":"r\n","client_ip":"i"},
                "method":"G\"T","uri":"/\u00e9","headers":{"x-\u0061":["\\"],"accept":["caf\u00e9"]}}}"#
                .to_owned(),
            // Payload before event_type: read raw, then typed.
            r#"{"payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},"method":"GET","uri":"/"},"version":1,"event_type":"request_headers"}"#
                .to_owned(),
            // Arrays for structs, as the derived impl accepts.
            r#"{"version":1,"event_type":"request_headers","payload":[["c","r","i",1,null,"HTTP/1.1",null,null,null,null,"t"],"GET","/",{"a":["b"]}]}"#
                .to_owned(),
            // Another event type.
            r#"{"version":1,"event_type":"response_headers","payload":{"correlation_id":"c","status":200}}"#
                .to_owned(),
            // Errors: missing, duplicate and mistyped fields, trailing bytes,
            // another version.
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","client_ip":"i"},"method":"GET","uri":"/"}}"#
                .to_owned(),
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},"uri":"/"}}"#
                .to_owned(),
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},"method":"GET","method":"PUT","uri":"/"}}"#
                .to_owned(),
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","correlation_id":"d","request_id":"r","client_ip":"i"},"method":"GET","uri":"/"}}"#
                .to_owned(),
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i","client_port":70000},"method":"GET","uri":"/"}}"#
                .to_owned(),
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},"method":"GET","uri":"/","headers":{"a":"b"}}}"#
                .to_owned(),
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},"method":"GET","uri":"/","headers":null}}"#
                .to_owned(),
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},"method":1,"uri":"/"}}"#
                .to_owned(),
            format!("{} x", full()),
            full().replace(r#""version":1"#, r#""version":2"#),
            // What the direct reader takes, and what it leaves to serde.
            String::from_utf8(bench_request()).unwrap(),
            format!(" \t\r\n{}\n ", full()),
            full().replace(r#""id":7"#, r#""id":null"#),
            full().replace(r#""id":7"#, r#""id":18446744073709551615"#),
            full().replace(r#""id":7"#, r#""id":18446744073709551616"#),
            full().replace(r#""id":7"#, r#""id":-7"#),
            full().replace(r#""id":7"#, r#""id":7.0"#),
            full().replace(r#""id":7"#, r#""id":7e0"#),
            full().replace(r#""id":7"#, r#""id":07"#),
            full().replace(r#""id":7"#, r#""id":"7""#),
            full().replace(r#""version":1"#, r#""version":4294967296"#),
            full().replace(r#""version":1"#, r#""version":01"#),
            full().replace(r#""version":1"#, r#""version":1,"version":1"#),
            full().replace(r#""client_port":443"#, r#""client_port":65535"#),
            full().replace(r#""client_port":443"#, r#""client_port":65536"#),
            full().replace(r#""client_port":443"#, r#""client_port":null"#),
            full().replace(r#""server_name":"a.test""#, r#""server_name":nullx"#),
            full().replace(r#""server_name":"a.test""#, r#""server_name":nul"#),
            full().replace(r#""uri":"/api?x=1""#, "\"uri\":\"/a\tb\""),
            full().replace(r#""uri":"/api?x=1""#, r#""uri":"/é ünï €""#),
            full().replace(r#""headers":{"#, r#""headers":{},"x":{"#),
            full().replace(r#""headers":{"#, r#""headers":{"a":[],"#),
            full().replace(r#"["a","b"]"#, r#"["a","b",]"#),
            full().replace(r#"["a","b"]"#, r#"["a" "b"]"#),
            full().replace(r#"["a","b"]"#, r#"[]"#),
            full().replace(r#"["a","b"]"#, r#"[null]"#),
            full().replace(r#""x-z":["1","2","3"]"#, r#""x-z":["1","2","3"],"x-z":["4"]"#),
            full().replace(r#"}},"id":7}"#, r#"},"metadata":{}},"id":7}"#),
            full().replace(r#","id":7}"#, r#","id":7,}"#),
            full().replace(r#","id":7}"#, r#","other":[1,{"a":null}]}"#),
            full().replace(r#""request_headers""#, r#""configure""#),
            r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},"method":"GET","uri":"/","headers":{}}}"#
                .to_owned(),
        ];
        // Every text cut short, and with a byte changed here and there.
        let mut texts = texts.to_vec();
        let base = String::from_utf8(bench_request()).unwrap();
        for cut in 0..base.len() {
            texts.push(base[..cut].to_owned());
        }
        for at in 0..base.len() {
            for with in ['"', ',', '}', ']', ':', '\\', ' ', '0', 'x', '\u{1}'] {
                let mut bytes = base.clone().into_bytes();
                bytes[at] = with as u8;
                if let Ok(text) = String::from_utf8(bytes) {
                    texts.push(text);
                }
            }
        }
        let texts = &texts[..];
        // Each text after a few others (the whole square is too slow
        // for the mutations).
        let befores: Vec<&String> = texts.iter().take(12).collect();
        for before in befores {
            for text in texts {
                let want = AgentRequest::from_json(text.as_bytes());
                let mut spare: Option<RequestHeadersEvent> = None;
                if let Ok(earlier) = AgentRequest::from_json(before.as_bytes()) {
                    earlier.recycle(&mut spare);
                }
                let got = AgentRequest::from_json_recycling(text.as_bytes(), &mut spare);
                match (&want, &got) {
                    (Ok(w), Ok(g)) => assert_eq!(w, g, "{before}\nthen\n{text}"),
                    (Err(w), Err(g)) => {
                        assert_eq!(w.to_string(), g.to_string(), "{before}\nthen\n{text}")
                    }
                    _ => panic!("{before}\nthen\n{text}\n{want:?}\nvs\n{got:?}"),
                }
            }
        }
    }

    /// The `request_headers` event the proxy sends for a plain request.
    fn bench_request() -> Vec<u8> {
        let mut headers = crate::Headers::new();
        for (k, v) in [
            ("host", "bench"),
            ("user-agent", "sentinel-bench"),
            ("accept", "*/*"),
            ("x-request-id", "5d1c8b8e-6e0e-4f1b-9d2a-0c4e5e6f7a8b"),
            ("x-forwarded-for", "127.0.0.1"),
        ] {
            headers.insert(k.to_owned(), vec![v.to_owned()]);
        }
        let mut request = AgentRequest::new(Event::RequestHeaders(RequestHeadersEvent {
            metadata: crate::RequestMetadata {
                correlation_id: "0e9f2c1a".into(),
                request_id: "5d1c8b8e".into(),
                client_ip: "127.0.0.1".into(),
                client_port: 51544,
                server_name: Some("bench".into()),
                protocol: "HTTP/1.1".into(),
                tls_version: None,
                route_id: Some("all".into()),
                upstream_id: Some("backend".into()),
                listener: Some("bench".into()),
                timestamp: "2026-12-01T00:00:00.000Z".into(),
            },
            method: "GET".into(),
            uri: "/small".into(),
            headers,
        }));
        request.id = Some(123_456);
        request.to_json()
    }

    #[test]
    fn the_common_shape_takes_the_direct_reader() {
        let text = bench_request();
        let mut spare = None;
        let fast = crate::fast::request(std::str::from_utf8(&text).unwrap(), &mut spare);
        assert_eq!(fast, Some(AgentRequest::from_json(&text).unwrap()));
        let seed = r#"{"version":1,"event_type":"request_headers","payload":{"metadata":{"correlation_id":"c","request_id":"r","client_ip":"i"},"method":"GET","uri":"/"}}"#;
        assert!(crate::fast::request(seed, &mut None).is_some());
    }

    /// Header sets that grow, shrink and change between requests, all
    /// in the direct reader's shape.
    #[test]
    fn the_direct_reader_follows_changing_header_names() {
        let sets: [&[(&str, &[&str])]; 6] = [
            &[("a", &["1"]), ("c", &["3", "33"]), ("e", &["5"])],
            &[("b", &["2"]), ("c", &["x"]), ("d", &[]), ("f", &["6"])],
            &[],
            &[("a", &["1"]), ("b", &["2"]), ("c", &["3"]), ("d", &["4"])],
            &[("d", &["4", "44", "444"])],
            &[("a", &["1"]), ("z", &["26"])],
        ];
        let text = |set: &[(&str, &[&str])]| {
            let headers: Vec<String> = set
                .iter()
                .map(|(k, vs)| {
                    let vs: Vec<String> = vs.iter().map(|v| format!("\"{v}\"")).collect();
                    format!("\"{k}\":[{}]", vs.join(","))
                })
                .collect();
            format!(
                r#"{{"version":1,"event_type":"request_headers","payload":{{"metadata":{{"correlation_id":"c","request_id":"r","client_ip":"i"}},"method":"GET","uri":"/","headers":{{{}}}}},"id":1}}"#,
                headers.join(",")
            )
        };
        let mut spare = None;
        for round in 0..2 {
            for set in sets {
                let text = text(set);
                let got = crate::fast::request(&text, &mut spare)
                    .unwrap_or_else(|| panic!("round {round}: not the direct reader's: {text}"));
                assert_eq!(
                    got,
                    AgentRequest::from_json(text.as_bytes()).unwrap(),
                    "{text}"
                );
                got.recycle(&mut spare);
            }
        }
    }

    #[test]
    fn a_recycled_event_keeps_its_buffers() {
        let mut spare = None;
        AgentRequest::from_json(full().as_bytes())
            .unwrap()
            .recycle(&mut spare);
        let before = match &spare {
            Some(e) => (e.uri.as_ptr(), e.headers["x-z"].as_ptr()),
            None => unreachable!(),
        };
        let again = AgentRequest::from_json_recycling(full().as_bytes(), &mut spare).unwrap();
        assert!(spare.is_none(), "the spare is taken");
        let Event::RequestHeaders(e) = &again.event else {
            panic!("not request_headers");
        };
        assert_eq!((e.uri.as_ptr(), e.headers["x-z"].as_ptr()), before);
    }
}
