//! The proxy's blocks (`system`, `listeners`, `routes`, `upstreams`,
//! `limits`), `observability` and `profile`: defaults and problems.

use std::time::Duration;

use super::{
    tests::{Files, assert_problem, parse},
    *,
};

#[test]
fn omitted_options_take_their_defaults() {
    let cfg = parse(
        r#"
system { }
listeners { listener "l" { address "127.0.0.1:0"; } }
routes { route "r" { upstream "u"; } }
upstreams {
    upstream "u" {
        targets { target { address "127.0.0.1:1"; } }
        health-check { }
    }
}
limits { }
waf { body-inspection { } }
observability { logging { } }
profile { }
"#,
    )
    .unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(cfg.system, SystemConfig::default());
    assert_eq!(cfg.system.worker_threads, 0);
    assert_eq!(cfg.system.max_connections, 10_000);
    assert_eq!(
        cfg.system.graceful_shutdown_timeout,
        Duration::from_secs(30)
    );

    let l = &cfg.listeners[0];
    assert_eq!(l.protocol, ListenerProtocol::Http);
    assert_eq!(l.tls, None);
    assert_eq!(l.header_read_timeout, Duration::from_secs(10));
    assert_eq!(l.keepalive_timeout, Duration::from_secs(75));
    assert_eq!(l.request_timeout, Duration::from_secs(60));
    assert_eq!(l.max_connections, None);

    let r = &cfg.routes[0];
    assert_eq!(r.priority, 0);
    assert_eq!(r.matches, RouteMatch::default());
    assert!(r.filters.is_empty());
    assert_eq!(r.policies.failure_mode, FailureMode::Closed);
    assert_eq!(r.policies.max_body_bytes, None);
    assert_eq!(r.policies.timeout, None);

    let u = &cfg.upstreams[0];
    assert_eq!(u.targets[0].weight, 1);
    assert_eq!(u.load_balancing, LoadBalancing::RoundRobin);
    assert_eq!(u.protocol, UpstreamProtocol::Http1);
    assert_eq!(u.tls, None);
    let hc = u.health_check.as_ref().expect("health-check block given");
    assert_eq!(hc.path, "/health");
    assert_eq!(hc.expected_status, 200);
    assert_eq!(hc.interval, Duration::from_secs(10));
    assert_eq!(hc.timeout, Duration::from_secs(2));
    assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (2, 3));
    assert_eq!(u.passive_health.consecutive_failures, 5);
    assert_eq!(u.passive_health.ejection_time, Duration::from_secs(30));
    assert!(u.passive_health.count_5xx);
    assert_eq!(u.timeouts.connect, Duration::from_secs(5));
    assert_eq!(u.timeouts.read, Duration::from_secs(30));
    assert_eq!(u.timeouts.total, Duration::from_secs(60));
    assert_eq!(u.retries, 1);
    assert_eq!(u.pool.max_idle, 64);
    assert_eq!(u.pool.idle_timeout, Duration::from_secs(60));

    assert_eq!(cfg.limits.max_header_bytes, 65_536);
    assert_eq!(cfg.limits.max_header_count, 100);
    assert_eq!(cfg.limits.max_body_bytes, 10_485_760);

    // The seed's "Body Inspection Options" table.
    let b = &cfg.waf.body_inspection;
    assert!(!b.inspect_request_body);
    assert!(!b.inspect_response_body);
    assert_eq!(b.max_body_inspection_bytes, 1_048_576);
    assert_eq!(
        b.content_types,
        [
            "application/json",
            "application/x-www-form-urlencoded",
            "text/xml",
            "application/xml",
            "text/plain"
        ]
    );
    assert!(!b.decompress);
    assert_eq!(b.max_decompression_ratio, 100.0);
    assert_eq!(b.max_decompressed_bytes, 10 * 1024 * 1024);

    assert_eq!(cfg.observability.access_log, AccessLog::default());
    assert!(cfg.observability.access_log.enabled);
    assert_eq!(cfg.observability.access_log.format, LogFormat::Text);
    assert_eq!(cfg.profile.mode, ProfileMode::Protection);
}

#[test]
fn listener_problems() {
    let files = Files::new();
    let errors = files.errors(
        r#"listeners {
    listener "a" { address "127.0.0.1:8080"; }
    listener "b" { address "127.0.0.1:8080"; }
    listener "a" { address "localhost:80"; }
    listener "tls-missing" {
        address "127.0.0.1:8443"
        protocol "https"
    }
    listener "tls-on-http" {
        address "127.0.0.1:8081"
        tls { cert-file "$D/cert.pem"; key-file "$D/key.pem"; }
    }
    listener "no-ca" {
        address "127.0.0.1:8444"
        protocol "https"
        tls {
            cert-file "$D/missing.pem"
            key-file "$D/cert.pem"
            client-auth "optional"
        }
    }
    listener "files" {
        address "127.0.0.1:8445"
        protocol "https"
        tls {
            cert-file "$D/key.pem"
            key-file "$D/empty.pem"
            client-ca "$D/not-pem.txt"
            sni {
                certificate "bad_name" { cert-file "$D/cert.pem"; }
            }
        }
    }
    listener "c" { header-read-timeout-ms 0; keepalive-timeout-secs 7200; protcol "http"; }
    listener "d" { address "127.0.0.1:0"; address "127.0.0.1:1"; }
    listener "any" { address "0.0.0.0:9000"; }
    listener "one" { address "127.0.0.2:9000"; }
    listener "v6" { address "[::1]:9000"; }
}
"#,
    );
    assert_problem(
        &errors,
        "3:28",
        "listener 'b': address 127.0.0.1:8080 is already used by listener 'a'",
    );
    assert_problem(
        &errors,
        "4:14",
        "listener 'a' is defined twice (first on line 2)",
    );
    assert_problem(&errors, "4:28", "'address' must be IP:PORT");
    assert_problem(
        &errors,
        "7:9",
        "listener 'tls-missing' is https but has no 'tls' block",
    );
    assert_problem(
        &errors,
        "11:9",
        "listener 'tls-on-http' has a 'tls' block but is not https",
    );
    assert_problem(
        &errors,
        "17:23",
        &format!(
            "'cert-file' file '{}' does not exist",
            files.path("missing.pem").display()
        ),
    );
    assert_problem(&errors, "18:22", "cert.pem' holds no PEM private key");
    assert_problem(&errors, "19:13", "'client-auth' needs a 'client-ca'");
    assert_problem(&errors, "26:23", "key.pem' holds no PEM certificate");
    assert_problem(&errors, "27:22", "empty.pem' holds no PEM private key");
    assert_problem(&errors, "28:23", "not-pem.txt' holds no PEM certificate");
    assert_problem(&errors, "30:29", "'bad_name' is not a server name");
    assert_problem(&errors, "30:17", "'certificate' needs a 'key-file'");
    assert_problem(&errors, "34:5", "listener 'c' needs an 'address'");
    assert_problem(
        &errors,
        "34:43",
        "'header-read-timeout-ms' must be between 1 and 300000, found 0",
    );
    assert_problem(
        &errors,
        "34:69",
        "'keepalive-timeout-secs' must be between 1 and 3600, found 7200",
    );
    assert_problem(
        &errors,
        "34:75",
        "unknown option in 'listener' 'protcol' (did you mean 'protocol'?)",
    );
    assert_problem(
        &errors,
        "37:30",
        "listener 'one': address 127.0.0.2:9000 overlaps 0.0.0.0:9000 of listener 'any'",
    );
    assert_problem(
        &errors,
        "35:43",
        "'address' is given more than once in 'listener'",
    );
}

#[test]
fn route_problems() {
    let errors = parse(
        r#"routes {
    route "neither" { priority 1; }
    route "both" {
        upstream "u"
        static-response 200 "ok"
    }
    route "status" { static-response 600 "no"; }
    route "refs" {
        upstream "backnd"
        filters "waf" "nope" "waf"
    }
    route "matches" {
        upstream "backend"
        matches {
            path-prefix "api/"
            host "bad host"
            method "G T"
            header "bad header" "x"
            header "a" "b" "c"
            cookie "x"
        }
        policies { failure-mode "half"; timeout-secs 0; }
    }
}
upstreams { upstream "backend" { targets { target { address "127.0.0.1:1"; } } } }
filters { filter "waf" { agent "a"; } }
agents { agent "a" type="custom" { http "http://127.0.0.1:1/"; } }
"#,
    )
    .unwrap_err();
    assert_problem(
        &errors,
        "2:5",
        "route 'neither' needs an 'upstream' or a 'static-response'",
    );
    assert_problem(
        &errors,
        "5:9",
        "route 'both' has both 'upstream' and 'static-response'",
    );
    assert_problem(&errors, "4:18", "route 'both': upstream 'u' is not defined");
    assert_problem(
        &errors,
        "7:38",
        "'static-response' must be between 100 and 599, found 600",
    );
    assert_problem(
        &errors,
        "9:18",
        "route 'refs': upstream 'backnd' is not defined (did you mean 'backend'?)",
    );
    assert_problem(
        &errors,
        "10:23",
        "route 'refs': filter 'nope' is not defined",
    );
    assert_problem(&errors, "10:30", "filter 'waf' is listed twice");
    assert_problem(&errors, "15:25", "'path-prefix' must start with '/'");
    assert_problem(&errors, "16:18", "'bad host' is not a host name");
    assert_problem(&errors, "17:20", "'G T' is not an HTTP method");
    assert_problem(&errors, "18:20", "'bad header' is not a header name");
    assert_problem(
        &errors,
        "19:28",
        "'header' takes a name and an optional value",
    );
    assert_problem(&errors, "20:13", "unknown option in 'matches' 'cookie'");
    assert_problem(
        &errors,
        "22:33",
        "'failure-mode' must be \"open\" or \"closed\", found \"half\"",
    );
    assert_problem(
        &errors,
        "22:54",
        "'timeout-secs' must be between 1 and 86400, found 0",
    );
    assert_eq!(errors.len(), 15, "{errors:#?}");
}

#[test]
fn upstream_problems() {
    let files = Files::new();
    let errors = files.errors(
        r#"upstreams {
    upstream "none" { retries 1; }
    upstream "empty" { targets { } }
    upstream "bad" {
        targets {
            target { address "backend"; }
            target { address "10.0.0.1:0"; weight 0; }
            target { weight 2; }
            target { address "b.internal:80"; }
            target { address "b.internal:80"; }
        }
        load-balancing "random"
        tls {
            ca-cert "$D/absent.pem"
            client-cert "$D/cert.pem"
            insecure-skip-verify "yes"
        }
        health-check { expected-status 99; path "health"; interval-secs 1; timeout-ms 5000; }
        passive-health { consecutive-failures 0; count-5xx "yes"; }
        timeouts { connect-ms 0; read-ms 3600001; }
        retries 11
    }
}
"#,
    );
    assert_problem(&errors, "2:5", "upstream 'none' needs at least one target");
    assert_problem(
        &errors,
        "3:24",
        "upstream 'empty' needs at least one target",
    );
    assert_problem(&errors, "6:30", "target address 'backend' is not host:port");
    assert_problem(
        &errors,
        "7:30",
        "'10.0.0.1:0': port 0 cannot be connected to",
    );
    assert_problem(
        &errors,
        "7:51",
        "'weight' must be between 1 and 1000, found 0",
    );
    assert_problem(&errors, "8:13", "'target' needs an 'address'");
    assert_problem(&errors, "10:30", "target 'b.internal:80' is listed twice");
    assert_problem(
        &errors,
        "12:24",
        "'load-balancing' must be \"round_robin\" or \"least_connections\"",
    );
    assert_problem(&errors, "14:21", "absent.pem' does not exist");
    assert_problem(&errors, "15:13", "'client-cert' needs a 'client-key'");
    assert_problem(
        &errors,
        "16:34",
        "'insecure-skip-verify' must be #true or #false",
    );
    assert_problem(
        &errors,
        "18:40",
        "'expected-status' must be between 100 and 599, found 99",
    );
    assert_problem(&errors, "18:49", "'path' must start with '/'");
    assert_problem(
        &errors,
        "18:76",
        "'timeout-ms' (5000) is longer than 'interval-secs' (1)",
    );
    assert_problem(
        &errors,
        "19:47",
        "'consecutive-failures' must be between 1 and 1000, found 0",
    );
    assert_problem(&errors, "19:60", "'count-5xx' must be #true or #false");
    assert_problem(
        &errors,
        "20:31",
        "'connect-ms' must be between 1 and 300000, found 0",
    );
    assert_problem(
        &errors,
        "20:42",
        "'read-ms' must be between 1 and 3600000, found 3600001",
    );
    assert_problem(
        &errors,
        "21:17",
        "'retries' must be between 0 and 10, found 11",
    );
    assert_eq!(errors.len(), 19, "{errors:#?}");
}

#[test]
fn system_limits_observability_profile_problems() {
    let errors = parse(
        r#"system { worker-threads -1; max-connections 0; }
limits { max-header-bytes 10; max-header-count 0; max-body-byte 1; }
observability { logging { format "xml"; access-log 1; } }
profile { mode "strict"; }
sytem { }
"#,
    )
    .unwrap_err();
    assert_problem(
        &errors,
        "1:25",
        "'worker-threads' must be between 0 and 1024, found -1",
    );
    assert_problem(
        &errors,
        "1:45",
        "'max-connections' must be between 1 and 10000000, found 0",
    );
    assert_problem(
        &errors,
        "2:27",
        "'max-header-bytes' must be between 1024 and 16777216",
    );
    assert_problem(
        &errors,
        "2:48",
        "'max-header-count' must be between 1 and 10000, found 0",
    );
    assert_problem(
        &errors,
        "2:51",
        "unknown option in 'limits' 'max-body-byte' (did you mean 'max-body-bytes'?)",
    );
    assert_problem(
        &errors,
        "3:34",
        "'format' must be \"text\" or \"json\", found \"xml\"",
    );
    assert_problem(
        &errors,
        "3:52",
        "'access-log' must be #true or #false, found an integer",
    );
    assert_problem(
        &errors,
        "4:16",
        "'mode' must be \"off\", \"lite\", \"monitor\" or \"protection\", found \"strict\"",
    );
    assert_problem(
        &errors,
        "5:1",
        "unknown block 'sytem' (did you mean 'system'?)",
    );
    assert_eq!(errors.len(), 9, "{errors:#?}");
}

#[test]
fn flags_are_bare_or_boolean_and_options_need_separators() {
    let cfg = parse(
        r#"upstreams {
    upstream "a" {
        targets { target { address "127.0.0.1:1"; } }
        tls { insecure-skip-verify #false; }
    }
    upstream "b" {
        targets { target { address "127.0.0.1:2"; } }
        tls { insecure-skip-verify #true; }
    }
}
"#,
    )
    .unwrap_or_else(|e| panic!("{e:#?}"));
    let skip = |i: usize| {
        cfg.upstreams[i]
            .tls
            .as_ref()
            .map(|t| t.insecure_skip_verify)
    };
    assert_eq!((skip(0), skip(1)), (Some(false), Some(true)));

    // Two options on one line without ';' are one node with extra values.
    let errors = parse(
        r#"upstreams {
    upstream "a" { targets { target { address "127.0.0.1:3000" weight 1 } } }
}
"#,
    )
    .unwrap_err();
    assert_problem(
        &errors,
        "2:64",
        "'address' takes exactly one value; to write another option on the same line, end this one with ';'",
    );
}
