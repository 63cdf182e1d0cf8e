//! Steering decisions that need no kernel: plans, encoding, order.

use super::*;

fn listener(name: &'static str, bound: &str, quarantine: bool) -> PlanListener<'static> {
    PlanListener {
        name,
        bound: bound.parse().unwrap(),
        quarantine,
        dual_stack: false,
    }
}

#[test]
fn nothing_configured_steers_nothing() {
    let listeners = [listener("http", "0.0.0.0:8080", false)];
    assert!(Steering::plan(&[], &listeners).is_empty());
    // A quarantine listener alone has no one to quarantine from.
    let alone = [listener("q", "127.0.0.1:9000", true)];
    assert!(Steering::plan(&[], &alone).is_empty());
}

#[test]
fn quarantine_adds_the_other_listeners_own_addresses_only() {
    let listeners = [
        listener("http", "0.0.0.0:8080", false),
        listener("v6", "[2001:db8::1]:443", false),
        listener("q", "127.0.0.1:9000", true),
    ];
    let rules = [PlanRule {
        listener: "http",
        prefix: "198.51.100.0/24".parse().unwrap(),
        ports: (1, 65535),
        protocol: SteerProtocol::Tcp,
    }];
    let plan = Steering::plan(&rules, &listeners);
    assert_eq!(plan.quarantine.as_deref(), Some("q"));
    let tcp = SteerProtocol::Tcp;
    assert_eq!(
        plan.targets,
        vec![
            (
                "http".into(),
                "198.51.100.0/24".parse().unwrap(),
                (1, 65535),
                tcp
            ),
            (
                "http".into(),
                "0.0.0.0/0".parse().unwrap(),
                (8080, 8080),
                tcp
            ),
            (
                "v6".into(),
                "2001:db8::1/128".parse().unwrap(),
                (443, 443),
                tcp
            ),
        ]
    );
}

#[test]
fn a_dual_stack_listener_is_steered_for_both_families() {
    let mut any = listener("http", "[::]:8080", false);
    any.dual_stack = true;
    let listeners = [any, listener("q", "[::]:9000", true)];
    let plan = Steering::plan(&[], &listeners);
    let tcp = SteerProtocol::Tcp;
    assert_eq!(
        plan.targets,
        vec![
            ("http".into(), "::/0".parse().unwrap(), (8080, 8080), tcp),
            (
                "http".into(),
                "0.0.0.0/0".parse().unwrap(),
                (8080, 8080),
                tcp
            ),
        ]
    );
    // IPV6_V6ONLY: IPv6 only.
    let only = [listener("http", "[::]:8080", false), listeners[1]];
    assert_eq!(Steering::plan(&[], &only).targets.len(), 1);
}

#[test]
fn dual_stack_reads_the_socket() {
    let any = std::net::TcpListener::bind("[::]:0").unwrap();
    let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bound = any.local_addr().unwrap();
    // std leaves IPV6_V6ONLY at the sysctl's default.
    let sysctl = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
        .map(|v| v.trim() == "0")
        .unwrap_or(true);
    assert_eq!(dual_stack(bound, &any), sysctl);
    assert!(!dual_stack(v4.local_addr().unwrap(), &v4));
}

#[test]
fn rules_encode_masked_network_order_words() {
    let rule = SteerTarget {
        prefix: "198.51.100.0/24".parse().unwrap(),
        ports: (80, 81),
        protocol: SteerProtocol::Tcp,
        slot: 3,
    }
    .encode();
    assert_eq!(rule.addr[0].to_ne_bytes(), [198, 51, 100, 0]);
    assert_eq!(rule.mask[0].to_ne_bytes(), [255, 255, 255, 0]);
    assert_eq!(
        (rule.family, rule.protocol, rule.slot),
        (AF_INET, IPPROTO_TCP, 3)
    );
    let v6 = SteerTarget {
        prefix: "2001:db8::/36".parse().unwrap(),
        ports: (1, 1),
        protocol: SteerProtocol::Udp,
        slot: 0,
    }
    .encode();
    assert_eq!(v6.mask[1].to_ne_bytes(), [0xf0, 0, 0, 0]);
    assert_eq!(v6.mask[2], 0);
    assert_eq!((v6.family, v6.protocol), (AF_INET6, IPPROTO_UDP));
}

#[test]
fn most_specific_first() {
    let t = |prefix: &str, ports| SteerTarget {
        prefix: prefix.parse().unwrap(),
        ports,
        protocol: SteerProtocol::Tcp,
        slot: 0,
    };
    let mut v = [
        t("0.0.0.0/0", (1, 1)),
        t("10.0.0.0/8", (1, 65535)),
        t("10.0.0.0/8", (80, 80)),
    ];
    v.sort_by_key(SteerTarget::specificity);
    assert_eq!(v[0].ports, (80, 80));
    assert_eq!(v[1].ports, (1, 65535));
    assert_eq!(v[2].prefix.prefix_len(), 0);
}
