//! Conveniences for reading a request's headers event.

use std::net::IpAddr;

use sentinel_agent_protocol::RequestHeadersEvent;

/// What an agent usually wants from a `request_headers` event.
pub trait RequestExt {
    /// The path of the URI, without the query, as the client sent it.
    fn path(&self) -> &str;
    /// The query, without the `?`.
    fn query(&self) -> Option<&str>;
    /// The first value of a header; `name` in any case.
    fn header(&self, name: &str) -> Option<&str>;
    /// Every value of a header; `name` in any case.
    fn header_values(&self, name: &str) -> &[String];
    /// The client's address; an IPv4-mapped IPv6 address as IPv4.
    fn client_ip(&self) -> Option<IpAddr>;
}

impl RequestExt for RequestHeadersEvent {
    fn path(&self) -> &str {
        let uri = self.uri.as_str();
        // An absolute-form target (`http://host/path`) has its path after
        // the authority.
        let uri = match uri.split_once("://") {
            Some((_, rest)) if !uri.starts_with('/') => {
                rest.find('/').map_or("/", |slash| &rest[slash..])
            }
            _ => uri,
        };
        let end = uri.find(['?', '#']).unwrap_or(uri.len());
        &uri[..end]
    }

    fn query(&self) -> Option<&str> {
        let (_, query) = self.uri.split_once('?')?;
        Some(query.split_once('#').map_or(query, |(q, _)| q))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).first().map(String::as_str)
    }

    fn header_values(&self, name: &str) -> &[String] {
        // The proxy sends names in lowercase; look the name up that way
        // first, then fall back to a scan for a sender that does not.
        if let Some(values) = self.headers.get(name) {
            return values;
        }
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or(&[], |(_, v)| v.as_slice())
    }

    fn client_ip(&self) -> Option<IpAddr> {
        self.metadata
            .client_ip
            .parse::<IpAddr>()
            .ok()
            .map(|ip| ip.to_canonical())
    }
}

#[cfg(test)]
mod tests {
    use sentinel_agent_protocol::{Headers, RequestMetadata};

    use super::*;

    fn event(uri: &str, ip: &str) -> RequestHeadersEvent {
        RequestHeadersEvent {
            metadata: RequestMetadata {
                client_ip: ip.into(),
                ..RequestMetadata::default()
            },
            method: "GET".into(),
            uri: uri.into(),
            headers: Headers::from([
                ("host".into(), vec!["example.test".into()]),
                ("x-many".into(), vec!["1".into(), "2".into()]),
            ]),
        }
    }

    #[test]
    fn path_and_query() {
        let e = event("/a/b?c=d#frag", "");
        assert_eq!(e.path(), "/a/b");
        assert_eq!(e.query(), Some("c=d"));
        assert_eq!(event("/plain", "").query(), None);
        assert_eq!(event("http://h.test/x?y", "").path(), "/x");
        assert_eq!(event("http://h.test", "").path(), "/");
        assert_eq!(event("*", "").path(), "*");
    }

    #[test]
    fn headers_by_any_case() {
        let e = event("/", "");
        assert_eq!(e.header("Host"), Some("example.test"));
        assert_eq!(e.header_values("X-MANY"), ["1", "2"]);
        assert_eq!(e.header("absent"), None);
    }

    #[test]
    fn client_ip_is_canonical() {
        assert_eq!(
            event("/", "::ffff:192.0.2.1").client_ip(),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            event("/", "2001:db8::1").client_ip(),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(event("/", "").client_ip(), None);
    }
}
