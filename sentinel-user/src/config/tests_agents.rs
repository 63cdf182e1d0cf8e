//! The agents, filters and waf blocks: the seed's syntax, defaults and
//! transport messages.

use std::time::Duration;

use serde_json::json;

use super::{
    tests::{Files, assert_problem, parse},
    *,
};

/// The seed's "Default Values" table, for an agent that sets nothing.
#[test]
fn agent_defaults_are_the_seeds() {
    let cfg = parse(
        r#"agents {
    agent "a" type="custom" {
        http "http://policy-service:8080/agent"
    }
}
"#,
    )
    .unwrap_or_else(|e| panic!("{e:#?}"));
    let a = &cfg.agents[0];
    assert_eq!(a.timeout, Duration::from_millis(1000));
    assert_eq!(a.failure_mode, FailureMode::Open);
    assert_eq!(a.chunk_timeout, Duration::from_millis(5000));
    assert_eq!(a.request_body_mode, BodyMode::Buffer);
    assert_eq!(a.response_body_mode, BodyMode::Buffer);
    assert_eq!(a.circuit_breaker.failure_threshold, 5);
    assert_eq!(a.circuit_breaker.success_threshold, 2);
    assert_eq!(a.circuit_breaker.timeout, Duration::from_secs(30));
    assert_eq!(a.circuit_breaker.half_open_max_requests, 1);
    assert!(a.events.is_empty());
    assert_eq!(a.max_request_body_bytes, None);
    assert_eq!(a.max_response_body_bytes, None);
    assert_eq!(a.config, json!({}));
}

/// The seed's own "Complete WAF Example", as written there.
#[test]
fn seed_waf_example_parses() {
    let files = Files::new();
    let cfg = files
        .parse(
            r#"
waf {
    body-inspection {
        inspect-request-body #true
        max-body-inspection-bytes 1048576
        content-types "application/json" "application/xml" "text/plain"
        decompress #true
        max-decompression-ratio 100.0
    }
}

agents {
    agent "modsecurity" type="waf" {
        unix-socket "$D/agent.sock"
        events "request_headers" "request_body"
        timeout-ms 200
        failure-mode "closed"
        request-body-mode "buffer"
        circuit-breaker {
            failure-threshold 10
            timeout-seconds 60
        }
        config {
            rules-path "/etc/modsecurity/crs"
            paranoia-level 2
        }
    }
    agent "dev-agent" type="custom" {
        grpc "https://localhost:50051" {
            insecure-skip-verify
        }
        events "request_headers"
    }
}

routes {
    route "api" {
        matches { path-prefix "/api/" }
        upstream "backend"
        policies {
            failure-mode "closed"   // Used for decompression errors
        }
        filters "waf-filter"
    }
}

upstreams { upstream "backend" { targets { target { address "127.0.0.1:3000"; } } } }

filters {
    filter "waf-filter" {
        type "agent"
        agent "modsecurity"
        phase "request"
        failure-mode "closed"
    }
}
"#,
        )
        .unwrap_or_else(|e| panic!("{e:#?}"));
    let waf = &cfg.agents[0];
    assert_eq!(
        waf.config,
        json!({ "rules-path": "/etc/modsecurity/crs", "paranoia-level": 2 })
    );
    assert_eq!(waf.circuit_breaker.failure_threshold, 10);
    assert_eq!(waf.circuit_breaker.success_threshold, 2);
    assert_eq!(waf.circuit_breaker.timeout, Duration::from_secs(60));
    let AgentTransport::Grpc { tls, .. } = &cfg.agents[1].transport else {
        panic!("{:?}", cfg.agents[1].transport);
    };
    assert!(tls.insecure_skip_verify);
    assert_eq!(tls.ca_cert, None);
    assert!(cfg.waf.body_inspection.inspect_request_body);
    assert_eq!(cfg.routes[0].filters, ["waf-filter"]);
}

/// The three messages of the seed's "Configuration Validation" section,
/// word for word after the position.
#[test]
fn seed_transport_messages() {
    let files = Files::new();
    let missing = files.path("auth.sock");
    let plain = files.path("plain-file");
    let errors = files.errors(
        r#"agents {
    agent "auth" type="auth" { unix-socket "$D/auth.sock"; }
    agent "waf" type="waf" { unix-socket "$D/plain-file"; }
    agent "remote" type="waf" { grpc "invalid-url"; }
    agent "web" type="custom" { http "ftp://policy:21/"; }
    agent "ok" type="custom" { unix-socket "$D/agent.sock"; }
}
"#,
    );
    assert_eq!(
        errors,
        [
            format!(
                "test.kdl:2:44: Agent 'auth' socket path '{}' does not exist",
                missing.display()
            ),
            format!(
                "test.kdl:3:42: Agent 'waf' path '{}' exists but is not a socket",
                plain.display()
            ),
            "test.kdl:4:38: Agent 'remote' gRPC address 'invalid-url' is not a valid URL"
                .to_owned(),
            "test.kdl:5:38: Agent 'web' HTTP address 'ftp://policy:21/' is not a valid URL"
                .to_owned(),
        ]
    );
}

#[test]
fn url_checks() {
    for (url, valid) in [
        ("http://localhost:50051", true),
        ("https://auth-service.internal:50051", true),
        ("http://[::1]:50051", true),
        ("http://10.0.0.1/agent", true),
        ("invalid-url", false),
        ("localhost:50051", false),
        ("http://", false),
        ("unix:///var/run/x.sock", false),
        ("", false),
    ] {
        let text = format!("agents {{ agent \"a\" type=\"auth\" {{ grpc \"{url}\"; }} }}");
        assert_eq!(parse(&text).is_ok(), valid, "{url}");
    }
}

#[test]
fn agent_problems() {
    let files = Files::new();
    let errors = files.errors(
        r#"agents {
    agent "untyped" { http "http://a:1/"; }
    agent "typo" type="firewall" { http "http://a:1/"; }
    agent "none" type="waf" { events "request_headers"; }
    agent "two" type="waf" {
        unix-socket "$D/agent.sock"
        grpc "http://a:1"
    }
    agent "breaker" type="waf" {
        http "http://a:1/"
        circuit-breaker {
            failure-threshold 0
            success-threshold 0
            timeout-seconds 0
            half-open-max-requests 0
        }
        timeout-ms 300001
        chunk-timeout-ms 0
    }
    agent "bodies" type="waf" {
        http "http://a:1/"
        request-body-mode "hybrid:0"
        response-body-mode "chunked"
        max-request-body-bytes 0
        events "request_header" "log" "log"
    }
    agent "tls" type="auth" {
        grpc "http://a:1" { ca-cert "$D/ca.pem"; }
    }
    agent "files" type="auth" {
        http "https://a:1/" {
            ca-cert "$D/key.pem"
            client-cert "$D/cert.pem"
            client-key "$D/cert.pem"
            verify #false
        }
    }
    agent "json" type="custom" {
        http "http://a:1/"
        config {
            a 1 { b 2; }
            a 2
            big 18446744073709551616
        }
    }
    agent "typo" type="custom" { http "http://a:1/"; }
}
"#,
    );
    assert_problem(&errors, "2:5", "agent 'untyped' needs a type");
    assert_problem(
        &errors,
        "3:18",
        "agent type must be \"waf\", \"auth\", \"rate_limit\" or \"custom\", found \"firewall\"",
    );
    assert_problem(&errors, "4:5", "agent 'none' needs a transport");
    assert_problem(
        &errors,
        "7:9",
        "agent 'two' has more than one transport ('unix-socket' and 'grpc')",
    );
    assert_problem(
        &errors,
        "12:31",
        "'failure-threshold' must be between 1 and 10000, found 0",
    );
    assert_problem(
        &errors,
        "13:31",
        "'success-threshold' must be between 1 and 10000, found 0",
    );
    assert_problem(
        &errors,
        "14:29",
        "'timeout-seconds' must be between 1 and 3600, found 0",
    );
    assert_problem(
        &errors,
        "15:36",
        "'half-open-max-requests' must be between 1 and 10000, found 0",
    );
    assert_problem(
        &errors,
        "17:20",
        "'timeout-ms' must be between 1 and 300000, found 300001",
    );
    assert_problem(
        &errors,
        "18:26",
        "'chunk-timeout-ms' must be between 1 and 300000, found 0",
    );
    assert_problem(
        &errors,
        "22:27",
        "'request-body-mode' hybrid threshold must be between 1 and 1073741824 bytes, found 0",
    );
    assert_problem(
        &errors,
        "23:28",
        "'response-body-mode' must be \"buffer\", \"stream\" or \"hybrid:<bytes>\", found \"chunked\"",
    );
    assert_problem(
        &errors,
        "24:32",
        "'max-request-body-bytes' must be between 1 and",
    );
    assert_problem(
        &errors,
        "25:16",
        "unknown event 'request_header' (did you mean 'request_headers'?)",
    );
    assert_problem(&errors, "25:39", "event 'log' is listed twice");
    assert_problem(
        &errors,
        "28:14",
        "agent 'tls': TLS options need an https:// address",
    );
    assert_problem(&errors, "32:21", "key.pem' holds no PEM certificate");
    assert_problem(&errors, "34:24", "'client-key' file '");
    assert_problem(&errors, "35:13", "unknown option in 'http' 'verify'");
    assert_problem(
        &errors,
        "41:13",
        "'a' takes values, or properties and a { ... } block, not both",
    );
    assert_problem(&errors, "42:13", "key 'a' appears twice in 'config'");
    assert_problem(
        &errors,
        "43:17",
        "'big': 18446744073709551616 does not fit in 64 bits",
    );
    assert_problem(
        &errors,
        "46:11",
        "agent 'typo' is defined twice (first on line 3)",
    );
    assert_eq!(errors.len(), 23, "{errors:#?}");
}

#[test]
fn filter_and_waf_problems() {
    let errors = parse(
        r#"filters {
    filter "f" { type "lua"; agent "modsecurty"; phase "early"; timeout-ms 0; }
    filter "g" { failure-mode "closed"; }
}
agents { agent "modsecurity" type="waf" { http "http://a:1/"; } }
waf {
    body-inspection {
        max-decompression-ratio 1.0
        content-types "json" "text/plain" "text/plain"
        max-body-inspection-bytes 0
        decompress "yes"
    }
}
"#,
    )
    .unwrap_err();
    assert_problem(&errors, "2:23", "'type' must be \"agent\", found \"lua\"");
    assert_problem(
        &errors,
        "2:36",
        "filter 'f': agent 'modsecurty' is not defined (did you mean 'modsecurity'?)",
    );
    assert_problem(
        &errors,
        "2:56",
        "'phase' must be \"request\", \"response\" or \"both\"",
    );
    assert_problem(
        &errors,
        "2:76",
        "'timeout-ms' must be between 1 and 300000, found 0",
    );
    assert_problem(&errors, "3:5", "filter 'g' needs an 'agent'");
    assert_problem(
        &errors,
        "8:33",
        "'max-decompression-ratio' must be greater than 1.0, found 1.0",
    );
    assert_problem(&errors, "9:23", "'json' is not a content type");
    assert_problem(&errors, "9:43", "content type 'text/plain' is listed twice");
    assert_problem(
        &errors,
        "10:35",
        "'max-body-inspection-bytes' must be between 1 and",
    );
    assert_problem(
        &errors,
        "11:20",
        "'decompress' must be #true or #false, found a string",
    );
    assert_eq!(errors.len(), 10, "{errors:#?}");
}

/// One file with a mistake in every block: all of them come back, in
/// file order, each with its position.
#[test]
fn every_problem_at_once() {
    let files = Files::new();
    let errors = files.errors(
        r#"system { worker-threads "four"; }
listeners { listener "web" { address "0.0.0.0:80"; protocol "https"; } }
routes { route "r" { upstream "missing"; filters "f"; } }
upstreams { upstream "u" { targets { target { address "nope"; } } } }
filters { filter "f" { agent "ghost"; } }
agents { agent "a" type="waf" { request-body-mode "hybrid:0"; circuit-breaker { timeout-seconds 0; }; unix-socket "$D/gone.sock"; } }
waf { body-inspection { max-decompression-ratio 0.5; } }
limits { max-header-count "many"; }
observability { metrics { adress "127.0.0.1:1"; } }
kernel { xdp-mode "turbo"; }
admin { socket "relative"; }
profile { mode "on"; }
"#,
    );
    let positions: Vec<&str> = errors
        .iter()
        .map(|e| {
            let rest = e.strip_prefix("test.kdl:").expect("file name first");
            let mut parts = rest.splitn(3, ':');
            let line = parts.next().unwrap_or_default();
            let column = parts.next().unwrap_or_default();
            &rest[..line.len() + column.len() + 1]
        })
        .collect();
    assert_eq!(
        positions,
        [
            "1:25", "2:52", "3:31", "4:55", "5:30", "6:51", "6:97", "6:115", "7:49", "8:27",
            "9:27", "10:10", "11:9", "12:16",
        ],
        "{errors:#?}"
    );
    assert!(
        errors[3].contains("'nope' is not host:port"),
        "{}",
        errors[3]
    );
    assert!(
        errors[7].contains("Agent 'a' socket path '"),
        "{}",
        errors[5]
    );
}

/// The options this project adds to the seed's agent and waf blocks:
/// defaults, and bounds that keep a push from naming everyone.
#[test]
fn kernel_push_guardrail_and_challenge_options() {
    let cfg = parse(
        r#"agents {
    agent "a" type="waf" {
        http "http://a:1/"
        kernel-push
    }
}
"#,
    )
    .unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(cfg.agents[0].kernel_push, Some(KernelPushConfig::default()));
    assert_eq!(
        KernelPushConfig::default(),
        KernelPushConfig {
            max_ttl: Duration::from_secs(3600),
            min_prefix_len_v4: 32,
            min_prefix_len_v6: 64,
        }
    );
    assert_eq!(cfg.waf.challenge, ChallengeConfig::default());
    assert_eq!(cfg.waf.challenge.status, 403);
    assert_eq!(cfg.waf.challenge.difficulty, 16);

    let errors = parse(
        r#"agents {
    agent "a" type="waf" {
        http "http://a:1/"
        kernel-push {
            max-ttl-seconds 0
            min-prefix-length-v4 0
            min-prefix-length-v6 8
            max-ttl 5
        }
        max-concurrent-calls 0
        guardrail-types "toxicity"
    }
}
waf {
    challenge {
        status 99
        cookie-name "a b"
        difficulty 40
        page "/nonexistent/challenge.html"
    }
}
"#,
    )
    .unwrap_err();
    assert_problem(&errors, "5:29", "'max-ttl-seconds' must be between 1 and");
    assert_problem(
        &errors,
        "6:34",
        "'min-prefix-length-v4' must be between 8 and 32",
    );
    assert_problem(
        &errors,
        "7:34",
        "'min-prefix-length-v6' must be between 16 and 128",
    );
    assert_problem(&errors, "8:13", "unknown option in 'kernel-push' 'max-ttl'");
    assert_problem(
        &errors,
        "10:30",
        "'max-concurrent-calls' must be between 1 and",
    );
    assert_problem(&errors, "11:25", "unknown guardrail type 'toxicity'");
    assert_problem(&errors, "16:16", "'status' must be between 200 and 599");
    assert_problem(&errors, "17:21", "'cookie-name' must be letters");
    assert_problem(&errors, "18:20", "'difficulty' must be between 0 and 32");
    assert_problem(
        &errors,
        "19:14",
        "'page' file '/nonexistent/challenge.html' does not exist",
    );
    assert_eq!(errors.len(), 10, "{errors:#?}");
}

#[test]
fn profile_problems() {
    let errors = parse(
        r#"profile {
    mode "strict"
    collector {
        url "ftp://x"
        header "only-a-name"
        backoff-min-ms 500
        backoff-max-ms 100
    }
    store { max-files 0; }
    secure-headers { x-frame-options "a\nb"; x-powered-by "no"; }
    metadata { body-bytes 99999999; }
}
routes {
    route "r" {
        static-response 200 "ok"
        profile { mode "loud"; }
    }
}
"#,
    )
    .unwrap_err();
    assert_problem(&errors, "2:10", "found \"strict\"");
    assert_problem(&errors, "3:5", "'collector' needs a 'store'");
    assert_problem(
        &errors,
        "4:13",
        "collector url 'ftp://x' is not a valid URL",
    );
    assert_problem(&errors, "5:9", "'header' takes a name and a value");
    assert_problem(&errors, "3:5", "'backoff-min-ms' is above 'backoff-max-ms'");
    assert_problem(&errors, "9:5", "'store' needs a 'path'");
    assert_problem(&errors, "9:23", "'max-files' must be between 1 and");
    assert_problem(
        &errors,
        "10:38",
        "'x-frame-options' is not a valid header value",
    );
    assert_problem(
        &errors,
        "10:46",
        "unknown option in 'secure-headers' 'x-powered-by'",
    );
    assert_problem(&errors, "11:27", "'body-bytes' must be between 0 and");
    assert_problem(&errors, "16:24", "found \"loud\"");
    assert_eq!(errors.len(), 11, "{errors:#?}");
}
