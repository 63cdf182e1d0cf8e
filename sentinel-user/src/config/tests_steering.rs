//! `kernel { steering { ... } }` and the listeners' `quarantine` flag.

use super::{tests::parse, *};
use crate::kernel::steer::SteerProtocol;

const LISTENERS: &str = r#"
listeners {
    listener "http" { address "[::]:8080"; }
    listener "suspect" { address "[::]:8081"; quarantine; }
}
"#;

#[test]
fn rules_and_the_quarantine_listener() {
    let cfg = parse(&format!(
        r#"{LISTENERS}
kernel {{
    steering {{
        rule listener="http" prefix="198.51.100.0/24" ports="1-65535" protocol="tcp"
        rule listener="http" prefix="2001:db8::/32" ports=443
    }}
}}
"#
    ))
    .unwrap();
    assert_eq!(
        cfg.kernel.steering,
        vec![
            SteeringRule {
                listener: "http".into(),
                prefix: "198.51.100.0/24".parse().unwrap(),
                ports: (1, 65535),
                protocol: SteerProtocol::Tcp,
            },
            SteeringRule {
                listener: "http".into(),
                prefix: "2001:db8::/32".parse().unwrap(),
                ports: (443, 443),
                protocol: SteerProtocol::Tcp,
            },
        ]
    );
    assert!(!cfg.listeners[0].quarantine);
    assert!(cfg.listeners[1].quarantine);
}

#[test]
fn defaults_steer_nothing() {
    let cfg = parse(LISTENERS).unwrap();
    assert!(cfg.kernel.steering.is_empty());
}

#[test]
fn every_problem_is_reported_where_it_is() {
    let errors = parse(&format!(
        r#"{LISTENERS}
kernel {{
    steering {{
        rule listener="htp" prefix="198.51.100.0/24" ports="1-65535"
        rule listener="http" prefix="198.51.100.1/24" ports=80
        rule listener="http" prefix="198.51.100.0/24" ports="90-80"
        rule listener="http" prefix="198.51.100.0/24" ports=80 protocol="udp"
        rule listener="http" prefix="198.51.100.0/24" ports=0
        rule listener="http" prefix="198.51.100.0/24" port=80
        rule listener="http" ports=80
        rule "http"
    }}
}}
"#
    ))
    .unwrap_err();
    let expected = [
        "test.kdl:9:14: steering rule: listener 'htp' is not defined (did you mean 'http'?)",
        "test.kdl:10:30: 198.51.100.1/24 has host bits set (did you mean 198.51.100.0/24?)",
        "test.kdl:11:55: 'ports': range \"90-80\" is empty (low above high)",
        "test.kdl:12:64: protocol \"udp\" cannot be steered: listeners accept TCP only",
        "test.kdl:13:55: 'ports': 0 is not a port (1-65535)",
        "test.kdl:14:55: unknown property 'port' (did you mean 'ports'?)",
        "test.kdl:15:9: steering rule needs prefix=",
        "test.kdl:16:14: 'rule' takes properties: listener=, prefix=, ports= and protocol=",
    ];
    assert_eq!(errors, expected, "{errors:#?}");
}

#[test]
fn duplicates_and_a_second_quarantine_listener_are_refused() {
    let errors = parse(
        r#"
listeners {
    listener "a" { address "127.0.0.1:8080"; quarantine; }
    listener "b" { address "127.0.0.1:8081"; quarantine #true; }
    listener "c" { address "127.0.0.1:8082"; quarantine #false; }
}
kernel {
    steering {
        rule listener="a" prefix="198.51.100.0/24" ports=80
        rule listener="c" prefix="198.51.100.0/24" ports=80
    }
}
"#,
    )
    .unwrap_err();
    assert_eq!(
        errors,
        [
            "test.kdl:4:5: listener 'b' is a second quarantine listener: 'a' already is one",
            "test.kdl:10:9: steering rule for 198.51.100.0/24 ports 80-80 is listed twice",
        ],
        "{errors:#?}"
    );
}

#[test]
fn steering_a_family_to_a_socket_that_cannot_take_it_is_refused() {
    let errors = parse(
        r#"
listeners {
    listener "v4" { address "127.0.0.1:8080"; }
    listener "v6" { address "[::1]:8080"; }
    listener "q" { address "127.0.0.1:8081"; quarantine; }
}
kernel {
    steering {
        rule listener="v4" prefix="198.51.100.0/24" ports=80
        rule listener="v4" prefix="2001:db8::/48" ports=80
        rule listener="v6" prefix="2001:db8:1::/48" ports=80
    }
}
"#,
    )
    .unwrap_err();
    assert_eq!(
        errors,
        [
            "test.kdl:5:28: quarantine listener 'q' is bound to the IPv4 address 127.0.0.1:8081, \
             which cannot take the IPv6 connections of watchlisted sources that the steering \
             rule for 2001:db8::/48 steers; bind it to \"[::]:8081\" to quarantine both families",
            "test.kdl:10:9: steering rule for 2001:db8::/48: listener 'v4' is bound to the IPv4 \
             address 127.0.0.1:8080, which cannot take IPv6 connections; bind it to an IPv6 \
             address (\"[::]:8080\" takes both families)",
        ],
        "{errors:#?}"
    );
    // An IPv6 listener alone is steered too once a quarantine listener
    // exists (its own address, for watchlisted sources).
    let errors = parse(
        r#"
listeners {
    listener "v6" { address "[::1]:8080"; }
    listener "q" { address "127.0.0.1:8081"; quarantine; }
}
"#,
    )
    .unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("that listener 'v6' ([::1]:8080) steers"),
        "{errors:#?}"
    );
    // A dual-stack quarantine listener takes both; IPv4 rules may steer to
    // an IPv6 listener (dual-stack unless IPV6_V6ONLY).
    parse(
        r#"
listeners {
    listener "v6" { address "[::1]:8080"; }
    listener "q" { address "[::]:8081"; quarantine; }
}
kernel {
    steering {
        rule listener="v6" prefix="198.51.100.0/24" ports=80
        rule listener="v6" prefix="2001:db8::/48" ports=80
    }
}
"#,
    )
    .unwrap();
}
