//! Routing: the first route, by descending priority then file order, whose
//! every condition holds. No match is a 404.

use std::{borrow::Cow, sync::Arc};

use http::{HeaderMap, Method, request::Parts};

use super::upstream::Upstream;
use crate::config::{RouteConfig, RouteMatch, RoutePolicies, StaticResponse};

/// Where a matched request goes.
pub enum Action {
    Forward(Arc<Upstream>),
    Respond(StaticResponse),
}

/// A route, its references resolved.
pub struct Route {
    pub name: String,
    pub action: Action,
    pub filters: Vec<String>,
    pub policies: RoutePolicies,
    matcher: Matcher,
}

impl Route {
    pub fn new(cfg: &RouteConfig, action: Action) -> Self {
        Self {
            name: cfg.name.clone(),
            action,
            filters: cfg.filters.clone(),
            policies: cfg.policies.clone(),
            matcher: Matcher::new(&cfg.matches),
        }
    }
}

/// The routes of one configuration generation.
pub struct Router {
    routes: Vec<Arc<Route>>,
    /// Whether any route matches on the host: only then is it worked out.
    needs_host: bool,
}

impl Router {
    /// `routes` in file order; ties in priority keep that order.
    pub fn new(mut routes: Vec<(i64, Route)>) -> Self {
        routes.sort_by_key(|(priority, _)| std::cmp::Reverse(*priority));
        let needs_host = routes.iter().any(|(_, r)| !r.matcher.hosts.is_empty());
        Self {
            routes: routes.into_iter().map(|(_, r)| Arc::new(r)).collect(),
            needs_host,
        }
    }

    pub fn route(&self, parts: &Parts) -> Option<Arc<Route>> {
        let host = if self.needs_host {
            request_host(parts)
        } else {
            None
        };
        self.routes
            .iter()
            .find(|r| r.matcher.matches(parts, host.as_deref()))
            .cloned()
    }
}

/// The request's host, lowercased and without its port: the URI's
/// authority (HTTP/2, absolute-form) or the `Host` header. Borrowed from
/// the request unless it had to be lowercased.
pub fn request_host(parts: &Parts) -> Option<Cow<'_, str>> {
    match parts.uri.authority() {
        Some(authority) => lowercase(authority.host()),
        None => host_of(
            None,
            parts.headers.get(http::header::HOST).map(|v| v.as_bytes()),
        ),
    }
}

/// [`request_host`] from what a profile record's capture keeps of the
/// request: the URI's authority as text, and the first `Host` header's
/// bytes. The same host as `request_host` for the same request.
pub fn host_of<'a>(authority: Option<&'a str>, host: Option<&'a [u8]>) -> Option<Cow<'a, str>> {
    let raw = match authority {
        Some(authority) => authority_host(authority),
        None => {
            let host = host?;
            // As `HeaderValue::to_str` takes it: visible ASCII and tabs
            // only (which is UTF-8, so the check below cannot fail).
            if !host.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
                return None;
            }
            strip_port(std::str::from_utf8(host).ok()?)
        }
    };
    lowercase(raw)
}

/// The host of a URI authority, as `http::uri::Authority::host` gives it
/// (IPv6 in its brackets): after any userinfo, before any port.
fn authority_host(authority: &str) -> &str {
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    if host_port.starts_with('[') {
        host_port
            .find(']')
            .map_or(host_port, |end| &host_port[..=end])
    } else {
        host_port.split(':').next().unwrap_or(host_port)
    }
}

fn lowercase(raw: &str) -> Option<Cow<'_, str>> {
    Some(if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(raw.to_ascii_lowercase())
    } else {
        Cow::Borrowed(raw)
    })
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    // Bytes, not chars: host names are short, and a char search's set-up
    // cost more than the search.
    match host.bytes().rposition(|b| b == b':') {
        Some(colon) if host.as_bytes()[colon + 1..].iter().all(u8::is_ascii_digit) => {
            &host[..colon]
        }
        _ => host,
    }
}

struct Matcher {
    path_prefix: Vec<String>,
    path: Vec<String>,
    hosts: Vec<HostPattern>,
    methods: Vec<Method>,
    headers: Vec<(http::HeaderName, Option<String>)>,
}

enum HostPattern {
    Exact(String),
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
}

impl Matcher {
    fn new(m: &RouteMatch) -> Self {
        Self {
            path_prefix: m.path_prefix.clone(),
            path: m.path.clone(),
            hosts: m
                .host
                .iter()
                .map(|h| {
                    let h = h.to_ascii_lowercase();
                    match h.strip_prefix('*') {
                        Some(suffix) => HostPattern::Suffix(suffix.to_owned()),
                        None => HostPattern::Exact(h),
                    }
                })
                .collect(),
            // Names were validated with the configuration; one that is not
            // a method token could never match and is left out.
            methods: m
                .method
                .iter()
                .filter_map(|s| Method::from_bytes(s.as_bytes()).ok())
                .collect(),
            headers: m
                .headers
                .iter()
                .filter_map(|h| {
                    http::HeaderName::from_bytes(h.name.as_bytes())
                        .ok()
                        .map(|n| (n, h.value.clone()))
                })
                .collect(),
        }
    }

    fn matches(&self, parts: &Parts, host: Option<&str>) -> bool {
        let path = parts.uri.path();
        (self.path.is_empty() || self.path.iter().any(|p| p == path))
            && (self.path_prefix.is_empty()
                || self
                    .path_prefix
                    .iter()
                    .any(|p| path.starts_with(p.as_str())))
            && (self.methods.is_empty() || self.methods.contains(&parts.method))
            && (self.hosts.is_empty() || host.is_some_and(|h| self.host_matches(h)))
            && self
                .headers
                .iter()
                .all(|(name, value)| header_matches(&parts.headers, name, value.as_deref()))
    }

    fn host_matches(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| match p {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        })
    }
}

fn header_matches(headers: &HeaderMap, name: &http::HeaderName, value: Option<&str>) -> bool {
    match value {
        None => headers.contains_key(name),
        Some(want) => headers
            .get_all(name)
            .iter()
            .any(|v| v.as_bytes() == want.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderMatch;

    fn route(name: &str, m: RouteMatch) -> Route {
        let cfg = RouteConfig {
            name: name.to_owned(),
            priority: 0,
            matches: m,
            upstream: None,
            static_response: Some(StaticResponse {
                status: 200,
                body: String::new(),
            }),
            filters: Vec::new(),
            policies: RoutePolicies::default(),
            profile: Default::default(),
        };
        Route::new(
            &cfg,
            Action::Respond(StaticResponse {
                status: 200,
                body: String::new(),
            }),
        )
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(())
            .map(|r| r.into_parts().0)
            .expect("valid test request")
    }

    fn pick(router: &Router, p: &Parts) -> Option<String> {
        router.route(p).map(|r| r.name.clone())
    }

    #[test]
    fn priority_then_file_order() {
        let router = Router::new(vec![
            (0, route("catch-all", RouteMatch::default())),
            (
                10,
                route(
                    "api",
                    RouteMatch {
                        path_prefix: vec!["/api/".into()],
                        ..Default::default()
                    },
                ),
            ),
            (0, route("second", RouteMatch::default())),
        ]);
        assert_eq!(
            pick(&router, &parts("GET", "/api/x", &[])).as_deref(),
            Some("api")
        );
        assert_eq!(
            pick(&router, &parts("GET", "/other", &[])).as_deref(),
            Some("catch-all")
        );
    }

    #[test]
    fn every_condition_must_hold() {
        let m = RouteMatch {
            path: vec!["/exact".into()],
            host: vec!["*.example.com".into(), "example.org".into()],
            method: vec!["POST".into()],
            headers: vec![
                HeaderMatch {
                    name: "x-env".into(),
                    value: Some("prod".into()),
                },
                HeaderMatch {
                    name: "x-debug".into(),
                    value: None,
                },
            ],
            ..Default::default()
        };
        let router = Router::new(vec![(0, route("r", m))]);
        let ok = [
            ("host", "a.b.example.com:8080"),
            ("x-env", "prod"),
            ("x-debug", ""),
        ];
        assert!(pick(&router, &parts("POST", "/exact", &ok)).is_some());
        assert!(pick(&router, &parts("POST", "/exact?q=1", &ok)).is_some());
        assert!(pick(&router, &parts("GET", "/exact", &ok)).is_none());
        assert!(pick(&router, &parts("POST", "/exact/", &ok)).is_none());
        let bare = [("host", "example.com"), ("x-env", "prod"), ("x-debug", "")];
        assert!(pick(&router, &parts("POST", "/exact", &bare)).is_none());
        let org = [("host", "EXAMPLE.org"), ("x-env", "prod"), ("x-debug", "1")];
        assert!(pick(&router, &parts("POST", "/exact", &org)).is_some());
        let wrong_env = [("host", "example.org"), ("x-env", "dev"), ("x-debug", "1")];
        assert!(pick(&router, &parts("POST", "/exact", &wrong_env)).is_none());
        let no_debug = [("host", "example.org"), ("x-env", "prod")];
        assert!(pick(&router, &parts("POST", "/exact", &no_debug)).is_none());
        // HTTP/2 carries the host in the URI's authority.
        let h2 = [("x-env", "prod"), ("x-debug", "")];
        assert!(pick(&router, &parts("POST", "https://x.example.com/exact", &h2)).is_some());
    }

    #[test]
    fn hosts_are_lowercased_and_borrowed_when_they_can_be() {
        let p = parts("GET", "/", &[("host", "Example.COM:8080")]);
        assert!(matches!(request_host(&p), Some(Cow::Owned(h)) if h == "example.com"));
        let p = parts("GET", "/", &[("host", "example.com")]);
        assert!(matches!(
            request_host(&p),
            Some(Cow::Borrowed("example.com"))
        ));
        let p = parts("GET", "http://A.example/x", &[("host", "other")]);
        assert_eq!(request_host(&p).as_deref(), Some("a.example"));
        assert_eq!(request_host(&parts("GET", "/", &[])), None);
    }

    #[test]
    fn the_host_of_a_capture_is_the_host_of_the_request() {
        for uri in [
            "http://A.example/x",
            "http://a.example:8080/x",
            "http://user:pw@Host.test:1/x",
            "http://[2001:DB8::1]:8443/x",
            "http://[::1]/x",
            "http://127.0.0.1:80/x",
        ] {
            let p = parts("GET", uri, &[("host", "other")]);
            let authority = p.uri.authority().map(|a| a.as_str());
            assert_eq!(
                host_of(authority, Some(b"other")),
                request_host(&p),
                "{uri}"
            );
            // The reference: what `http` takes for the authority's host.
            let reference = p.uri.authority().unwrap().host().to_ascii_lowercase();
            assert_eq!(host_of(authority, None).as_deref(), Some(&*reference));
        }
        let mut headers: Vec<Vec<u8>> = [
            "example.com",
            "Example.COM:8080",
            "[2001:db8::1]:8443",
            "[::1]",
            "host:notaport",
            "tab\there",
            "",
            ":",
        ]
        .iter()
        .map(|h| h.as_bytes().to_vec())
        .collect();
        headers.push(b"caf\xc3\xa9.test".to_vec());
        headers.push(b"bad\xffbyte".to_vec());
        for host in headers {
            let mut p = parts("GET", "/", &[]);
            p.headers.insert(
                http::header::HOST,
                http::HeaderValue::from_bytes(&host).unwrap(),
            );
            assert_eq!(host_of(None, Some(&host)), request_host(&p), "{host:?}");
        }
        assert_eq!(host_of(None, None), None);
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
