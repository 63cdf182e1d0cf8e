//! Secure response headers: added to every response, the upstream's own
//! values kept unless told otherwise, HSTS on TLS listeners only.

use http::StatusCode;
use sentinel_tests::{
    http::{Reply, Upstream, empty, get, request, send_on, tls_connect},
    tls::Pki,
};

use super::*;

const SECURE: [&str; 5] = [
    "x-frame-options",
    "x-content-type-options",
    "referrer-policy",
    "permissions-policy",
    "cross-origin-opener-policy",
];

fn config(app: &Upstream, tls: &str, profile: &str) -> String {
    format!(
        "listeners {{\n    listener \"http\" {{\n        address \"127.0.0.1:0\"\n    }}\n{tls}}}\n\
         routes {{\n    route \"plain\" {{\n        matches {{ path-prefix \"/plain/\"; }}\n        upstream \"app\"\n        profile {{ secure-response-headers #false; }}\n    }}\n\
             route \"off\" {{\n        matches {{ path-prefix \"/off/\"; }}\n        upstream \"app\"\n        profile {{ mode \"off\"; }}\n    }}\n\
             route \"app\" {{\n        upstream \"app\"\n    }}\n}}\n\
         upstreams {{\n    upstream \"app\" {{\n        targets {{\n            target {{ address \"{}\"; }}\n        }}\n    }}\n}}\n\
         profile {{\n{profile}\n}}\n",
        app.target()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_headers_with_and_without_upstream_values() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let pki = Pki::new("headers");
    let cert = pki.server("edge", &["edge.test"]);
    let tls = format!(
        "    listener \"https\" {{\n        address \"127.0.0.1:0\"\n        protocol \"https\"\n        tls {{\n            cert-file \"{}\"\n            key-file \"{}\"\n        }}\n    }}\n",
        cert.cert_file.display(),
        cert.key_file.display()
    );
    let d = start(&config(
        &app,
        &tls,
        "    secure-response-headers #true\n    secure-headers { referrer-policy \"no-referrer\"; }",
    ));
    let addr = d.listener("http");

    let r = get(addr, "/").await;
    assert_eq!(r.status, StatusCode::OK, "{}", d.log());
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        r.header("referrer-policy"),
        Some("no-referrer"),
        "configured value"
    );
    assert_eq!(
        r.header("permissions-policy"),
        Some("camera=(), microphone=(), geolocation=()")
    );
    assert_eq!(r.header("cross-origin-opener-policy"), Some("same-origin"));
    assert_eq!(
        r.header("strict-transport-security"),
        None,
        "not over plain HTTP"
    );

    // The upstream's own value is kept.
    let r = get(addr, "/?set=x-frame-options:SAMEORIGIN").await;
    assert_eq!(r.header("x-frame-options"), Some("SAMEORIGIN"));

    // Routes that turn them off, or pass everything through.
    for path in ["/plain/x", "/off/x"] {
        let r = get(addr, path).await;
        for name in SECURE {
            assert_eq!(r.header(name), None, "{path}: {name}");
        }
    }

    // HSTS on the TLS listener.
    let client = pki.client_config(&[&rustls::version::TLS13], &[b"http/1.1"], None);
    let stream = tls_connect(d.listener("https"), client, "edge.test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r: Reply = send_on(stream, false, request("GET", "/", &[], empty(), false))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_replaces_the_upstreams_values() {
    if skip() {
        return;
    }
    let app = Upstream::start("app").await;
    let d = start(&config(
        &app,
        "",
        "    secure-response-headers #true\n    secure-headers {\n        override #true\n        permissions-policy \"\"\n    }",
    ));
    let r = get(d.listener("http"), "/?set=x-frame-options:ALLOWALL").await;
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(
        r.header("permissions-policy"),
        None,
        "an empty value leaves it out"
    );
}
