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
/// non-standard `Keep-Alive` and `Proxy-Connection`.
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

/// Removes hop-by-hop headers and those the `Connection` header names. When
/// `upgrade` is given, the upgrade handshake (`Connection: upgrade` and
/// `Upgrade`) is kept for the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol.clone());
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

/// Sets `X-Forwarded-For` (appended), `X-Forwarded-Proto`,
/// `X-Forwarded-Host` and `Forwarded` (appended) for a request from
/// `client` that arrived over `proto` for `host`.
pub fn set_forwarding(
    headers: &mut HeaderMap,
    client: SocketAddr,
    proto: &str,
    host: Option<&str>,
) {
    let ip = client.ip().to_canonical();
    let xff = match headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
    {
        Some(previous) => format!("{previous}, {ip}"),
        None => ip.to_string(),
    };
    insert(headers, &X_FORWARDED_FOR, &xff);
    insert(headers, &X_FORWARDED_PROTO, proto);

    let for_node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={for_node};proto={proto}");
    if let Some(host) = host.filter(|h| is_token_safe(h)) {
        insert(headers, &X_FORWARDED_HOST, host);
        element.push_str(";host=");
        // Hosts with a port contain ':', which a token does not allow.
        element.push_str(&format!("\"{host}\""));
    } else {
        headers.remove(&X_FORWARDED_HOST);
    }
    let forwarded = match headers.get(&FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(previous) if !previous.trim().is_empty() => format!("{previous}, {element}"),
        _ => element,
    };
    insert(headers, &FORWARDED, &forwarded);
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

fn insert(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name.clone(), value);
    }
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
    let id = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn request_ids_are_kept_or_made() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&mut h), "abc-123");
        let mut h = HeaderMap::new();
        let id = request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h["x-request-id"], id);
    }
}
