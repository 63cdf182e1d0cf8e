//! A file with every block and every option, read into the expected
//! values.

use std::{path::Path, time::Duration};

use serde_json::json;

use super::{tests::Files, *};

/// Every block and every option, none at its default.
const COMPLETE: &str = r#"
system {
    worker-threads 4
    max-connections 20000
    graceful-shutdown-timeout-secs 15
}
listeners {
    listener "http" {
        address "0.0.0.0:8080"
        protocol "http"
        header-read-timeout-ms 5000
        keepalive-timeout-secs 30
        request-timeout-secs 0
        max-connections 5000
    }
    listener "https" {
        address "[::]:8443"
        protocol "https"
        tls {
            cert-file "$D/cert.pem"
            key-file "$D/key.pem"
            min-version "1.3"
            client-auth "required"
            client-ca "$D/ca.pem"
            sni {
                certificate "api.example.com" "*.API.example.com" {
                    cert-file "$D/cert.pem"
                    key-file "$D/key.pem"
                }
            }
        }
    }
}
routes {
    route "api" {
        priority 100
        matches {
            path-prefix "/api/" "/v2/"
            path "/healthz"
            host "API.example.com" "*.example.com"
            method "GET" "POST"
            header "X-Env" "prod"
            header "x-debug"
        }
        upstream "backend"
        filters "waf-filter" "auth-filter"
        policies {
            failure-mode "open"
            max-body-bytes 1048576
            timeout-secs 30
        }
        profile {
            mode "lite"
            secure-response-headers #true
        }
    }
    route "fallback" {
        priority -1
        static-response 404 "not here"
    }
}
upstreams {
    upstream "backend" {
        targets {
            target { address "127.0.0.1:3000"; weight 3 }
            target { address "backend.internal:3000" }
        }
        load-balancing "least_connections"
        protocol "http2"
        tls {
            sni "backend.internal"
            ca-cert "$D/ca.pem"
            client-cert "$D/cert.pem"
            client-key "$D/key.pem"
            insecure-skip-verify
        }
        health-check {
            path "/ready"
            expected-status 204
            interval-secs 5
            timeout-ms 1000
            healthy-threshold 3
            unhealthy-threshold 4
        }
        passive-health { consecutive-failures 7; ejection-secs 10; count-5xx #false; }
        timeouts { connect-ms 1000; read-ms 2000; total-ms 3000; }
        retries 2
        connection-pool { max-idle 8; idle-timeout-secs 20; }
    }
}
filters {
    filter "waf-filter" {
        type "agent"
        agent "modsecurity"
        phase "both"
        timeout-ms 150
        failure-mode "closed"
    }
    filter "auth-filter" { agent "jwt-auth"; }
}
agents {
    agent "modsecurity" type="waf" {
        unix-socket "$D/agent.sock"
        events "request_headers" "request_body"
        timeout-ms 200
        chunk-timeout-ms 1000
        failure-mode "closed"
        circuit-breaker {
            failure-threshold 10
            success-threshold 3
            timeout-seconds 60
            half-open-max-requests 2
        }
        max-request-body-bytes 1048576
        max-response-body-bytes 5242880
        request-body-mode "hybrid:65536"
        response-body-mode "stream"
        config {
            rules-path "/etc/modsecurity/crs"
            paranoia-level 2
            block-suspicious #true
            ratio 0.5
            nothing #null
            bare
            tags "a" "b"
            limits { per-ip 10; burst 20; }
            owner name="ops" id=7
        }
        max-concurrent-calls 8
        kernel-push {
            max-ttl-seconds 600
            min-prefix-length-v4 24
        }
        guardrail-types "pii_detection" "prompt_injection"
    }
    agent "jwt-auth" type="auth" {
        grpc "https://auth.internal:50051" {
            ca-cert "$D/ca.pem"
            client-cert "$D/cert.pem"
            client-key "$D/key.pem"
        }
        events "request_headers"
    }
    agent "analytics" type="custom" {
        http "http://analytics:8080/log"
        events "log"
    }
    agent "limiter" type="rate_limit" {
        grpc "http://ratelimit.internal:50051"
    }
}
waf {
    body-inspection {
        inspect-request-body #true
        inspect-response-body #true
        max-body-inspection-bytes 2048
        content-types "application/json" "Text/Plain"
        decompress #true
        max-decompression-ratio 50.0
        max-decompressed-bytes 4096
    }
    challenge {
        status 429
        cookie-name "sx_pass"
        ttl-seconds 60
        difficulty 4
    }
}
limits {
    max-header-bytes 32768
    max-header-count 50
    max-body-bytes 0
}
observability {
    metrics { address "127.0.0.1:9191"; }
    logging {
        access-log #false
        format "json"
    }
}
kernel { interfaces "lo"; }
admin { socket "/tmp/sentinel-test.sock"; }
profile {
    mode "monitor"
    secure-response-headers #true
    secure-headers {
        x-frame-options "SAMEORIGIN"
        permissions-policy ""
        override #true
    }
    metadata {
        agent-id "edge-1"
        agent-name "sentinel-edge"
        body-bytes 100
        file-content-bytes 512
        redact-headers "Authorization" "x-api-key"
        redact-fields "password" "pin"
        host-sample-interval-secs 5
    }
    store {
        path "$D/records"
        max-file-bytes 1048576
        max-files 3
        queue-capacity 50
        fsync-interval-ms 250
    }
    collector {
        url "https://collector.example:8443/ingest" {
            ca-cert "$D/ca.pem"
        }
        batch-size 100
        flush-interval-ms 500
        timeout-ms 2000
        backoff-min-ms 100
        backoff-max-ms 10000
        header "authorization" "Bearer t0ken"
    }
}
"#;

#[test]
fn complete_file_reads_every_block() {
    let files = Files::new();
    let cfg = files.parse(COMPLETE).unwrap_or_else(|e| panic!("{e:#?}"));
    let d = |name: &str| files.path(name);

    assert_eq!(
        cfg.system,
        SystemConfig {
            worker_threads: 4,
            max_connections: 20_000,
            graceful_shutdown_timeout: Duration::from_secs(15),
        }
    );

    assert_eq!(cfg.listeners.len(), 2);
    assert_eq!(
        cfg.listeners[0],
        ListenerConfig {
            name: "http".into(),
            address: "0.0.0.0:8080".parse().unwrap(),
            protocol: ListenerProtocol::Http,
            tls: None,
            header_read_timeout: Duration::from_millis(5000),
            keepalive_timeout: Duration::from_secs(30),
            request_timeout: Duration::ZERO,
            max_connections: Some(5000),
            quarantine: false,
        }
    );
    let pair = || CertKey {
        cert_file: d("cert.pem"),
        key_file: d("key.pem"),
    };
    let https = &cfg.listeners[1];
    assert_eq!(https.address, "[::]:8443".parse().unwrap());
    assert_eq!(https.protocol, ListenerProtocol::Https);
    assert_eq!(https.max_connections, None);
    assert_eq!(
        https.tls,
        Some(ListenerTls {
            default_cert: pair(),
            sni: vec![SniCertificate {
                names: vec!["api.example.com".into(), "*.api.example.com".into()],
                cert: pair(),
            }],
            min_version: TlsVersion::V1_3,
            client_ca: Some(d("ca.pem")),
            client_auth: ClientAuth::Required,
        })
    );

    assert_eq!(
        cfg.routes[0],
        RouteConfig {
            name: "api".into(),
            priority: 100,
            matches: RouteMatch {
                path_prefix: vec!["/api/".into(), "/v2/".into()],
                path: vec!["/healthz".into()],
                host: vec!["api.example.com".into(), "*.example.com".into()],
                method: vec!["GET".into(), "POST".into()],
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
            },
            upstream: Some("backend".into()),
            static_response: None,
            filters: vec!["waf-filter".into(), "auth-filter".into()],
            policies: RoutePolicies {
                failure_mode: FailureMode::Open,
                max_body_bytes: Some(1_048_576),
                timeout: Some(Duration::from_secs(30)),
            },
            profile: RouteProfile {
                mode: Some(ProfileMode::Lite),
                secure_response_headers: Some(true),
            },
        }
    );
    let fallback = &cfg.routes[1];
    assert_eq!(fallback.profile, RouteProfile::default());
    assert_eq!(fallback.priority, -1);
    assert_eq!(fallback.upstream, None);
    assert_eq!(
        fallback.static_response,
        Some(StaticResponse {
            status: 404,
            body: "not here".into(),
        })
    );

    assert_eq!(
        cfg.upstreams,
        vec![UpstreamConfig {
            name: "backend".into(),
            targets: vec![
                TargetConfig {
                    address: "127.0.0.1:3000".into(),
                    weight: 3,
                },
                TargetConfig {
                    address: "backend.internal:3000".into(),
                    weight: 1,
                },
            ],
            load_balancing: LoadBalancing::LeastConnections,
            protocol: UpstreamProtocol::Http2,
            tls: Some(UpstreamTls {
                sni: Some("backend.internal".into()),
                ca_cert: Some(d("ca.pem")),
                client_cert: Some(pair()),
                insecure_skip_verify: true,
            }),
            health_check: Some(HealthCheck {
                path: "/ready".into(),
                expected_status: 204,
                interval: Duration::from_secs(5),
                timeout: Duration::from_millis(1000),
                healthy_threshold: 3,
                unhealthy_threshold: 4,
            }),
            passive_health: PassiveHealth {
                consecutive_failures: 7,
                ejection_time: Duration::from_secs(10),
                count_5xx: false,
            },
            timeouts: UpstreamTimeouts {
                connect: Duration::from_millis(1000),
                read: Duration::from_millis(2000),
                total: Duration::from_millis(3000),
            },
            retries: 2,
            pool: ConnectionPool {
                max_idle: 8,
                idle_timeout: Duration::from_secs(20),
            },
        }]
    );

    assert_eq!(
        cfg.filters,
        vec![
            FilterConfig {
                name: "waf-filter".into(),
                agent: "modsecurity".into(),
                phase: FilterPhase::Both,
                timeout: Some(Duration::from_millis(150)),
                failure_mode: Some(FailureMode::Closed),
            },
            FilterConfig {
                name: "auth-filter".into(),
                agent: "jwt-auth".into(),
                phase: FilterPhase::Request,
                timeout: None,
                failure_mode: None,
            },
        ]
    );

    assert_eq!(cfg.agents.len(), 4);
    assert_eq!(
        cfg.agents[0],
        AgentConfig {
            name: "modsecurity".into(),
            agent_type: AgentType::Waf,
            transport: AgentTransport::UnixSocket(d("agent.sock")),
            events: vec![AgentEvent::RequestHeaders, AgentEvent::RequestBody],
            timeout: Duration::from_millis(200),
            chunk_timeout: Duration::from_millis(1000),
            failure_mode: FailureMode::Closed,
            circuit_breaker: CircuitBreakerConfig {
                failure_threshold: 10,
                success_threshold: 3,
                timeout: Duration::from_secs(60),
                half_open_max_requests: 2,
            },
            max_request_body_bytes: Some(1_048_576),
            max_response_body_bytes: Some(5_242_880),
            request_body_mode: BodyMode::Hybrid(65_536),
            response_body_mode: BodyMode::Stream,
            config: json!({
                "rules-path": "/etc/modsecurity/crs",
                "paranoia-level": 2,
                "block-suspicious": true,
                "ratio": 0.5,
                "nothing": null,
                "bare": null,
                "tags": ["a", "b"],
                "limits": { "per-ip": 10, "burst": 20 },
                "owner": { "name": "ops", "id": 7 },
            }),
            max_concurrent_calls: 8,
            kernel_push: Some(KernelPushConfig {
                max_ttl: Duration::from_secs(600),
                min_prefix_len_v4: 24,
                min_prefix_len_v6: 64,
            }),
            guardrail_types: vec!["pii_detection".into(), "prompt_injection".into()],
        }
    );
    assert_eq!(cfg.agents[1].max_concurrent_calls, 100);
    assert_eq!(cfg.agents[1].kernel_push, None);
    assert_eq!(cfg.agents[1].guardrail_types, ["prompt_injection"]);
    assert_eq!(cfg.agents[1].agent_type, AgentType::Auth);
    assert_eq!(
        cfg.agents[1].transport,
        AgentTransport::Grpc {
            url: "https://auth.internal:50051".into(),
            tls: AgentTls {
                ca_cert: Some(d("ca.pem")),
                client_cert: Some(d("cert.pem")),
                client_key: Some(d("key.pem")),
                insecure_skip_verify: false,
            },
        }
    );
    assert_eq!(cfg.agents[2].agent_type, AgentType::Custom);
    assert_eq!(
        cfg.agents[2].transport,
        AgentTransport::Http {
            url: "http://analytics:8080/log".into(),
            tls: AgentTls::default(),
        }
    );
    assert_eq!(cfg.agents[2].events, [AgentEvent::Log]);
    assert_eq!(cfg.agents[3].agent_type, AgentType::RateLimit);

    assert_eq!(
        cfg.waf.body_inspection,
        BodyInspection {
            inspect_request_body: true,
            inspect_response_body: true,
            max_body_inspection_bytes: 2048,
            content_types: vec!["application/json".into(), "text/plain".into()],
            decompress: true,
            max_decompression_ratio: 50.0,
            max_decompressed_bytes: 4096,
        }
    );
    assert_eq!(
        cfg.waf.challenge,
        ChallengeConfig {
            status: 429,
            page: None,
            cookie_name: "sx_pass".into(),
            ttl: Duration::from_secs(60),
            difficulty: 4,
            secret_file: None,
        }
    );
    assert_eq!(
        cfg.limits,
        LimitsConfig {
            max_header_bytes: 32768,
            max_header_count: 50,
            max_body_bytes: 0,
        }
    );
    assert_eq!(
        cfg.observability,
        ObservabilityConfig {
            metrics_address: Some("127.0.0.1:9191".parse().unwrap()),
            access_log: AccessLog {
                enabled: false,
                format: LogFormat::Json,
            },
        }
    );
    assert_eq!(cfg.kernel.interfaces, ["lo"]);
    assert_eq!(cfg.admin.socket, Path::new("/tmp/sentinel-test.sock"));
    assert_eq!(
        cfg.profile,
        ProfileConfig {
            mode: ProfileMode::Monitor,
            secure_response_headers: true,
            secure_headers: SecureHeaders {
                x_frame_options: "SAMEORIGIN".into(),
                permissions_policy: String::new(),
                override_upstream: true,
                ..SecureHeaders::default()
            },
            metadata: MetadataConfig {
                agent_id: Some("edge-1".into()),
                agent_name: "sentinel-edge".into(),
                body_bytes: 100,
                file_content_bytes: 512,
                redact_headers: vec!["authorization".into(), "x-api-key".into()],
                redact_fields: vec!["password".into(), "pin".into()],
                host_sample_interval: Duration::from_secs(5),
            },
            store: Some(StoreConfig {
                path: d("records"),
                max_file_bytes: 1_048_576,
                max_files: 3,
                queue_capacity: 50,
                fsync_interval: Duration::from_millis(250),
            }),
            collector: Some(CollectorConfig {
                url: "https://collector.example:8443/ingest".into(),
                batch_size: 100,
                flush_interval: Duration::from_millis(500),
                timeout: Duration::from_millis(2000),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(10),
                headers: vec![("authorization".into(), "Bearer t0ken".into())],
                tls: AgentTls {
                    ca_cert: Some(d("ca.pem")),
                    ..AgentTls::default()
                },
            }),
        }
    );
}
