//! What changes in a request and a response on their way through: hop-by-hop
//! headers go, forwarding headers are set, every request gets an id.

use std::net::{IpAddr, SocketAddr};

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{self, CONNECTION, UPGRADE},
};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers meaningful only for one connection (RFC 9110 §7.6.1), plus the
/// non-standard `Keep-Alive` and `Proxy-Connection`; `Connection` first
/// (`strip_hop_by_hop` relies on its place).
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &UPGRADE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// Whether `name` is one of the hop-by-hop fields.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop().contains(&name)
}

/// Removes hop-by-hop headers and those the `Connection` header names. When
/// `upgrade` is given, the upgrade handshake (`Connection: upgrade` and
/// `Upgrade`) is kept for the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    // One pass over the names present finds which of the eight are there:
    // most requests carry none, most responses only `Connection`. Removing
    // all eight blindly costs a hash and a probe apiece, in both
    // directions of every request. Standard names compare as enum tags.
    let hop = hop_by_hop();
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 {
        // `Connection` (index 0) names more headers. Its values are cheap
        // to clone (shared bytes); the clones let those names be removed
        // by `&str`, without building a `HeaderName` for each.
        // There is usually one value; more go to a vector.
        let mut values = headers.get_all(CONNECTION).iter().cloned();
        let first = values.next();
        let rest: Vec<HeaderValue> = values.collect();
        for value in first.iter().chain(&rest) {
            remove_named(headers, value.as_bytes());
        }
    }
    for (i, name) in hop.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if let Some(protocol) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol.clone());
    }
}

/// Removes every field a `Connection` value names.
pub fn remove_named(headers: &mut HeaderMap, connection: &[u8]) {
    for name in connection.split(|&b| b == b',') {
        if let Ok(name) = std::str::from_utf8(name.trim_ascii()) {
            // An invalid name finds nothing and removes nothing.
            headers.remove(name);
        }
    }
}

/// The protocol a WebSocket-style upgrade asks for (HTTP/1.1 only).
pub fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(UPGRADE).cloned()).flatten()
}

/// The forwarding fields a request carries to the next hop, rendered once
/// as header lines (`name: value\r\n`): the HTTP/1.1 codec writes them
/// after the request's own fields as they are; hyper's paths (HTTP/2,
/// upgrades), which send a copy of the head, add them to the copy
/// ([`Forwarded::apply`]). Inserting four fields into every request's
/// `HeaderMap` (a hash, a probe and an allocation each) and encoding them
/// from it cost about 3,000 instructions a request (callgrind); this,
/// about a third of that.
pub struct Forwarded {
    lines: Vec<u8>,
    /// Each field's name, and its value's place in `lines`.
    fields: [(&'static HeaderName, u16, u16); 4],
    len: usize,
}

impl Forwarded {
    /// No fields: what health checks send.
    pub fn none() -> Self {
        Self {
            lines: Vec::new(),
            fields: [(&FORWARDED, 0, 0); 4],
            len: 0,
        }
    }

    /// The fields as header lines, each ending in CRLF.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Sets the fields in `headers`, replacing what is there.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for &(name, start, end) in &self.fields[..self.len] {
            let value = &self.lines[usize::from(start)..usize::from(end)];
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.insert(name.clone(), value);
            }
        }
    }

    /// Adds the field `name`, written `start` (its name and ": "), with
    /// the concatenation of `parts` as value. Values longer than the place
    /// a field records (64 KiB) are left out; a head that long is refused
    /// well before.
    fn push(&mut self, name: &'static HeaderName, start: &'static [u8], parts: &[&[u8]]) {
        debug_assert_eq!(&start[..start.len() - 2], name.as_str().as_bytes());
        let before = self.lines.len();
        self.lines.extend_from_slice(start);
        let start = self.lines.len();
        // Most parts are short and many empty: each copy is a call.
        for part in parts.iter().filter(|p| !p.is_empty()) {
            self.lines.extend_from_slice(part);
        }
        let end = self.lines.len();
        match (u16::try_from(start), u16::try_from(end)) {
            (Ok(start), Ok(end)) if self.len < self.fields.len() => {
                self.lines.extend_from_slice(b"\r\n");
                self.fields[self.len] = (name, start, end);
                self.len += 1;
            }
            _ => self.lines.truncate(before),
        }
    }
}

/// Takes the forwarding fields the client sent out of `headers` and
/// renders the request's own for the next hop: `X-Forwarded-For` and
/// `Forwarded` appended to the client's, `X-Forwarded-Proto` and
/// `X-Forwarded-Host` in place of them, for a request from `client` that
/// arrived over `proto` for `host`.
pub fn forwarding(
    headers: &mut HeaderMap,
    client: SocketAddr,
    proto: &'static str,
    host: Option<&str>,
) -> Forwarded {
    // One pass over the names present (most requests carry none of the
    // four) rather than a hashed lookup of each.
    let names = [
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &FORWARDED,
    ];
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = names.iter().position(|n| *n == name) {
            present |= 1 << i;
        }
    }
    let previous_for = (present & 1 != 0).then(|| previous(headers, &X_FORWARDED_FOR));
    let previous_forwarded = (present & 8 != 0).then(|| previous(headers, &FORWARDED));
    if present & 2 != 0 {
        headers.remove(&X_FORWARDED_PROTO);
    }
    if present & 4 != 0 {
        headers.remove(&X_FORWARDED_HOST);
    }
    let previous_for = previous_for.flatten();
    let previous_forwarded = previous_forwarded.flatten();

    let ip = client.ip().to_canonical();
    let mut ip_text = IpText::new();
    ip_text.write(ip);
    let ip_text = ip_text.as_bytes();
    let host = host.filter(|h| is_token_safe(h)).map(str::as_bytes);

    let room = 160
        + previous_for.as_ref().map_or(0, Vec::len)
        + previous_forwarded.as_ref().map_or(0, Vec::len)
        + 2 * host.map_or(0, <[u8]>::len);
    let mut fields = Forwarded {
        lines: Vec::with_capacity(room),
        ..Forwarded::none()
    };
    let separator = |previous: &Option<Vec<u8>>| -> &'static [u8] {
        if previous.is_some() { b", " } else { b"" }
    };
    fields.push(
        &X_FORWARDED_FOR,
        b"x-forwarded-for: ",
        &[
            previous_for.as_deref().unwrap_or_default(),
            separator(&previous_for),
            ip_text,
        ],
    );
    fields.push(
        &X_FORWARDED_PROTO,
        b"x-forwarded-proto: ",
        &[proto.as_bytes()],
    );
    if let Some(host) = host {
        fields.push(&X_FORWARDED_HOST, b"x-forwarded-host: ", &[host]);
    }
    // for=...;proto=...[;host="..."]; an IPv6 node is quoted and bracketed
    // (RFC 7239 §6), and a host always quoted: with a port it contains ':',
    // which a token does not allow.
    let (open, close): (&[u8], &[u8]) = match ip {
        IpAddr::V4(_) => (b"", b""),
        IpAddr::V6(_) => (b"\"[", b"]\""),
    };
    let (host_open, host, host_close): (&[u8], &[u8], &[u8]) = match host {
        Some(host) => (b";host=\"", host, b"\""),
        None => (b"", b"", b""),
    };
    fields.push(
        &FORWARDED,
        b"forwarded: ",
        &[
            previous_forwarded.as_deref().unwrap_or_default(),
            separator(&previous_forwarded),
            b"for=",
            open,
            ip_text,
            close,
            b";proto=",
            proto.as_bytes(),
            host_open,
            host,
            host_close,
        ],
    );
    fields
}

/// Removes every `name` field from `headers`; their values joined with
/// ", " (RFC 9110 §5.3) when there is something to append to.
fn previous(headers: &mut HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut joined: Option<Vec<u8>> = None;
    for value in headers.get_all(name) {
        let Some(text) = appendable(Some(value)) else {
            continue;
        };
        match &mut joined {
            Some(joined) => {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(text);
            }
            None => joined = Some(text.to_vec()),
        }
    }
    headers.remove(name);
    joined
}

/// A previous value to append to: text, and not blank.
fn appendable(value: Option<&HeaderValue>) -> Option<&[u8]> {
    value
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .map(str::as_bytes)
}

/// An IP address as text, on the stack.
pub(crate) struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    pub(crate) fn new() -> Self {
        Self {
            buf: [0; 48],
            len: 0,
        }
    }

    pub(crate) fn write(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    if octet >= 100 {
                        self.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        self.push(b'0' + octet / 10 % 10);
                    }
                    self.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::io::Write as _;
                let mut cursor = std::io::Cursor::new(&mut self.buf[..]);
                // 45 bytes at most ("ffff:...:255.255.255.255"), which fits.
                let _ = write!(cursor, "{v6}");
                self.len = cursor.position() as usize;
            }
        }
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub(crate) fn as_str(&self) -> &str {
        // Digits, dots, colons and hex letters only.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

/// Hosts come from the client: only plain host[:port] characters are
/// repeated into headers, so nothing can break out of a quoted string.
fn is_token_safe(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// The request's id: the client's `X-Request-Id` when it is a sane token,
/// otherwise a new UUID, which is written into the request.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return v.clone();
    }
    // Formatted on the stack, not through `Display` into a `String`, and
    // shared by the request's field and the response's through one
    // reference-counted owner: one allocation, where a copied value and
    // its first clone took two.
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    debug_assert!(text.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-'));
    // SAFETY: a hyphenated UUID is hexadecimal digits and hyphens, all of
    // them bytes a header value may hold.
    let id = unsafe { HeaderValue::from_maybe_shared_unchecked(bytes::Bytes::from_owner(text)) };
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request's forwarding fields, as hyper's paths set them.
    fn set_forwarding(
        h: &mut HeaderMap,
        client: SocketAddr,
        proto: &'static str,
        host: Option<&str>,
    ) {
        forwarding(h, client, proto, host).apply(h);
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, None);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn removes_what_every_connection_value_names() {
        let mut h = map(&[
            ("connection", "close"),
            ("connection", "X-One , x-two,"),
            ("close", "1"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, None);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        // Nothing hop-by-hop: nothing changes.
        let mut h = map(&[("host", "a"), ("x-kept", "yes")]);
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn writes_addresses_as_text() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "192.0.2.10",
            "::1",
            "2001:db8::ff00:42:8329",
        ] {
            let mut text = IpText::new();
            text.write(ip.parse().expect("address"));
            assert_eq!(std::str::from_utf8(text.as_bytes()), Ok(ip));
        }
        let mut h = HeaderMap::new();
        set_forwarding(
            &mut h,
            "[2001:db8::1]:443".parse().expect("addr"),
            "https",
            None,
        );
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https");
    }

    #[test]
    fn keeps_an_upgrade_handshake() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let proto = upgrade_request(&h);
        assert_eq!(
            proto.as_ref().map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        strip_hop_by_hop(&mut h, proto.as_ref());
        assert_eq!(
            h.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
        assert_eq!(
            h.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
    }

    #[test]
    fn appends_forwarding_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
        ]);
        set_forwarding(
            &mut h,
            "[::1]:5000".parse().expect("addr"),
            "https",
            Some("example.com:8443"),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "example.com:8443");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9, for=\"[::1]\";proto=https;host=\"example.com:8443\""
        );
        let mut h = HeaderMap::new();
        set_forwarding(
            &mut h,
            "[::ffff:192.0.2.1]:1".parse().expect("addr"),
            "http",
            Some("a\"b"),
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["forwarded"], "for=192.0.2.1;proto=http");
        assert!(h.get("x-forwarded-host").is_none());
    }

    #[test]
    fn renders_the_lines_the_codec_writes() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("host", "a"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "evil"),
        ]);
        let fields = forwarding(
            &mut h,
            "192.0.2.7:1234".parse().expect("addr"),
            "http",
            Some("example.com"),
        );
        assert_eq!(
            std::str::from_utf8(fields.lines()),
            Ok("x-forwarded-for: 203.0.113.9, 198.51.100.1, 192.0.2.7\r\n\
                x-forwarded-proto: http\r\n\
                x-forwarded-host: example.com\r\n\
                forwarded: for=192.0.2.7;proto=http;host=\"example.com\"\r\n")
        );
        // The client's own are gone from the head; the rest stays.
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host"]);
        assert!(Forwarded::none().lines().is_empty());
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&mut h), "abc-123");
        let mut h = HeaderMap::new();
        let id = request_id(&mut h);
        assert_eq!(id.len(), 36);
        let text = id.to_str().unwrap();
        let uuid = uuid::Uuid::parse_str(text).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
        assert_eq!(uuid.hyphenated().to_string(), text);
        assert_eq!(h["x-request-id"], id);
        assert_ne!(request_id(&mut HeaderMap::new()), id);
    }
}
