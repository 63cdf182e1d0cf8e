//! The runtime profile as the proxy applies it per request: each route's
//! operation mode (its own `profile { mode }`, else the global one) and the
//! secure response headers.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::config::{Config, ProfileMode, SecureHeaders};

/// The secure response headers, parsed once per configuration.
pub struct SecureHeaderSet {
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `Strict-Transport-Security`, for TLS listeners only.
    hsts: Option<HeaderValue>,
    override_upstream: bool,
}

impl SecureHeaderSet {
    pub fn new(cfg: &SecureHeaders) -> Self {
        // Validation checked every value; one that is empty is left out.
        let value = |v: &str| {
            (!v.is_empty())
                .then(|| HeaderValue::from_str(v).ok())
                .flatten()
        };
        let headers = [
            (header::X_FRAME_OPTIONS, &cfg.x_frame_options),
            (header::X_CONTENT_TYPE_OPTIONS, &cfg.x_content_type_options),
            (header::REFERRER_POLICY, &cfg.referrer_policy),
            (
                HeaderName::from_static("permissions-policy"),
                &cfg.permissions_policy,
            ),
            (
                HeaderName::from_static("cross-origin-opener-policy"),
                &cfg.cross_origin_opener_policy,
            ),
        ]
        .into_iter()
        .filter_map(|(name, v)| value(v).map(|v| (name, v)))
        .collect();
        Self {
            headers,
            hsts: value(&cfg.strict_transport_security),
            override_upstream: cfg.override_upstream,
        }
    }

    /// Adds the headers to a response; a value the upstream set stays
    /// unless `override` says otherwise. HSTS only over TLS.
    pub fn apply(&self, headers: &mut HeaderMap, tls: bool) {
        let hsts = self
            .hsts
            .as_ref()
            .filter(|_| tls)
            .map(|v| (header::STRICT_TRANSPORT_SECURITY, v));
        for (name, value) in self.headers.iter().map(|(n, v)| (n.clone(), v)).chain(hsts) {
            if self.override_upstream || !headers.contains_key(&name) {
                headers.insert(name, value.clone());
            }
        }
    }
}

/// Each route's mode and secure-headers switch.
pub struct Profiles {
    mode: ProfileMode,
    secure: bool,
    routes: HashMap<String, (ProfileMode, bool)>,
    pub headers: SecureHeaderSet,
}

impl Profiles {
    pub fn new(config: &Config) -> Self {
        let global = &config.profile;
        // Only routes that override the global profile: a lookup in an
        // empty map hashes nothing, and most configurations have no
        // override (this runs three times a request).
        let routes = config
            .routes
            .iter()
            .filter(|r| r.profile.mode.is_some() || r.profile.secure_response_headers.is_some())
            .map(|r| {
                (
                    r.name.clone(),
                    (
                        r.profile.mode.unwrap_or(global.mode),
                        r.profile
                            .secure_response_headers
                            .unwrap_or(global.secure_response_headers),
                    ),
                )
            })
            .collect();
        Self {
            mode: global.mode,
            secure: global.secure_response_headers,
            routes,
            headers: SecureHeaderSet::new(&global.secure_headers),
        }
    }

    /// The mode of requests on `route` (`None`: no route matched).
    pub fn mode(&self, route: Option<&str>) -> ProfileMode {
        route
            .and_then(|r| self.routes.get(r))
            .map_or(self.mode, |(m, _)| *m)
    }

    /// Whether responses on `route` get the secure headers. Never in `off`
    /// mode, which passes everything through as it is.
    pub fn secure_headers(&self, route: Option<&str>) -> bool {
        let (mode, secure) = route
            .and_then(|r| self.routes.get(r))
            .copied()
            .unwrap_or((self.mode, self.secure));
        secure && mode != ProfileMode::Off
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_without_their_own_profile_follow_the_global_one() {
        let text = r#"
listeners { listener "l" { address "127.0.0.1:0"; }; }
routes {
    route "own" { static-response 200; profile { mode "monitor"; secure-response-headers #false; }; }
    route "global" { static-response 200; }
}
profile { mode "lite"; secure-response-headers #true; }
"#;
        let config = Config::parse(&crate::config::Source::new(
            std::path::Path::new("test.kdl"),
            text,
        ))
        .expect("a valid config");
        let profiles = Profiles::new(&config);
        assert_eq!(profiles.routes.len(), 1, "only the override is kept");
        assert_eq!(profiles.mode(Some("own")), ProfileMode::Monitor);
        assert!(!profiles.secure_headers(Some("own")));
        for route in [Some("global"), None] {
            assert_eq!(profiles.mode(route), ProfileMode::Lite);
            assert!(profiles.secure_headers(route));
        }
    }

    #[test]
    fn upstream_values_stay_unless_overridden_and_hsts_needs_tls() {
        let set = SecureHeaderSet::new(&SecureHeaders::default());
        let mut h = HeaderMap::new();
        h.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
        set.apply(&mut h, false);
        assert_eq!(h[header::X_FRAME_OPTIONS], "SAMEORIGIN");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(h.get(header::STRICT_TRANSPORT_SECURITY).is_none());
        set.apply(&mut h, true);
        assert_eq!(
            h[header::STRICT_TRANSPORT_SECURITY],
            "max-age=31536000; includeSubDomains"
        );

        let set = SecureHeaderSet::new(&SecureHeaders {
            override_upstream: true,
            referrer_policy: String::new(),
            ..SecureHeaders::default()
        });
        let mut h = HeaderMap::new();
        h.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
        set.apply(&mut h, false);
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
        assert!(
            h.get(header::REFERRER_POLICY).is_none(),
            "an empty value leaves it out"
        );
    }
}
