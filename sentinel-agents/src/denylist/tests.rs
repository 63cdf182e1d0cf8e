use clap::Parser;
use sentinel_agent_sdk::{
    AgentResponse, Decision, KernelAction, KernelPush, RequestMetadata, ServerArgs,
};
use serde_json::json;

use super::*;

fn request(ip: &str, uri: &str) -> RequestHeadersEvent {
    RequestHeadersEvent {
        metadata: RequestMetadata {
            correlation_id: "c".into(),
            client_ip: ip.into(),
            ..RequestMetadata::default()
        },
        method: "GET".into(),
        uri: uri.into(),
        headers: Default::default(),
    }
}

fn configure(config: serde_json::Value, max_ttl: Option<u64>) -> ConfigureEvent {
    ConfigureEvent {
        agent_id: "denylist".into(),
        config,
        extensions: vec![extensions::KERNEL_PUSH.into()],
        kernel_push: max_ttl.map(|max_ttl_seconds| KernelPushLimits {
            max_ttl_seconds,
            min_prefix_len_v4: 24,
            min_prefix_len_v6: 64,
        }),
    }
}

fn agent(paths: &[&str], ips: &[&str], policy: KernelPolicy) -> DenylistAgent {
    let mut rules = Rules::default();
    for p in paths {
        rules.add_path(p).unwrap();
    }
    for ip in ips {
        rules.add_ip(ip).unwrap();
    }
    DenylistAgent::new(rules, policy, 1000)
}

const POLICY: KernelPolicy = KernelPolicy {
    after: 3,
    window: Duration::from_secs(60),
    ttl_seconds: 600,
};

fn answer(agent: &DenylistAgent, ip: &str, uri: &str, now: Instant) -> AgentResponse {
    agent.decide(&request(ip, uri), now).build().unwrap()
}

#[test]
fn blocked_paths_get_a_403_with_their_rule() {
    let a = agent(&["/admin"], &[], POLICY);
    let r = answer(&a, "192.0.2.1", "/admin/users?x=1", Instant::now());
    assert_eq!(
        r.decision,
        Decision::Block {
            status: 403,
            body: Some(BLOCK_BODY.into()),
            headers: [("content-type".into(), "text/plain; charset=utf-8".into())].into(),
        }
    );
    let audit = r.audit.unwrap();
    assert_eq!(audit.tags, ["denylist", "path"]);
    assert_eq!(audit.rule_ids, ["denylist:path:/admin"]);
    assert_eq!(audit.reason_codes, ["PATH_DENIED"]);
    assert!(r.kernel_push.is_none());

    // Encoded and dotted forms are the same path.
    for uri in ["/%61dmin", "/x/../admin", "//admin"] {
        assert_eq!(
            answer(&a, "192.0.2.1", uri, Instant::now()).decision.name(),
            "block",
            "{uri}"
        );
    }
    assert_eq!(
        answer(&a, "192.0.2.1", "/public?next=/admin", Instant::now()),
        AgentResponse::allow()
    );
}

#[test]
fn blocked_networks_get_a_403_with_their_rule() {
    let a = agent(&[], &["198.51.100.0/24", "2001:db8::/32"], POLICY);
    for ip in ["198.51.100.9", "::ffff:198.51.100.9", "2001:db8::1"] {
        let r = answer(&a, ip, "/", Instant::now());
        assert_eq!(r.decision.name(), "block", "{ip}");
        let audit = r.audit.unwrap();
        assert_eq!(audit.tags, ["denylist", "ip"]);
        assert_eq!(audit.reason_codes, ["IP_DENIED"]);
    }
    let r = answer(&a, "2001:db8:ffff::1", "/", Instant::now());
    assert_eq!(r.audit.unwrap().rule_ids, ["denylist:ip:2001:db8::/32"]);
    for ip in ["198.51.101.9", "2001:db9::1", "", "garbage"] {
        assert_eq!(
            answer(&a, ip, "/", Instant::now()),
            AgentResponse::allow(),
            "{ip}"
        );
    }
}

#[tokio::test]
async fn the_config_block_adds_rules_and_a_new_one_replaces_them() {
    let a = agent(&["/fixed"], &[], POLICY);
    let now = Instant::now();
    a.on_configure(&configure(
        json!({"paths": ["/secret"], "ips": "203.0.113.0/24"}),
        None,
    ))
    .await
    .unwrap();
    assert_eq!(
        answer(&a, "192.0.2.1", "/secret/x", now).decision.name(),
        "block"
    );
    assert_eq!(answer(&a, "203.0.113.5", "/", now).decision.name(), "block");
    assert_eq!(
        answer(&a, "192.0.2.1", "/fixed", now).decision.name(),
        "block"
    );

    a.on_configure(&configure(json!({"paths": "/other"}), None))
        .await
        .unwrap();
    assert_eq!(
        answer(&a, "192.0.2.1", "/secret/x", now),
        AgentResponse::allow()
    );
    assert_eq!(
        answer(&a, "192.0.2.1", "/other", now).decision.name(),
        "block"
    );
    assert_eq!(
        answer(&a, "192.0.2.1", "/fixed", now).decision.name(),
        "block"
    );

    // A refused configuration changes nothing.
    let err = a
        .on_configure(&configure(json!({"path": ["/typo"]}), None))
        .await
        .unwrap_err();
    assert!(err.reason.contains("unknown key \"path\""), "{err}");
    assert_eq!(
        answer(&a, "192.0.2.1", "/other", now).decision.name(),
        "block"
    );
}

#[tokio::test]
async fn repeat_offenders_are_pushed_once_the_proxy_offers_it() {
    let a = agent(&["/admin"], &[], POLICY);
    assert_eq!(a.extensions(), [extensions::KERNEL_PUSH]);
    let t0 = Instant::now();

    // No offer: never a push, however often.
    a.on_configure(&configure(json!({}), None)).await.unwrap();
    for _ in 0..10 {
        assert!(answer(&a, "192.0.2.1", "/admin", t0).kernel_push.is_none());
    }

    // Offered with a 60 s cap: the third block within the window pushes.
    a.on_configure(&configure(json!({}), Some(60)))
        .await
        .unwrap();
    let at = |s| t0 + Duration::from_secs(s);
    assert!(
        answer(&a, "192.0.2.1", "/admin", at(0))
            .kernel_push
            .is_none()
    );
    // Allowed requests do not count.
    assert_eq!(
        answer(&a, "192.0.2.1", "/ok", at(1)),
        AgentResponse::allow()
    );
    assert!(
        answer(&a, "192.0.2.1", "/admin", at(2))
            .kernel_push
            .is_none()
    );
    let third = answer(&a, "192.0.2.1", "/admin", at(3));
    assert_eq!(third.decision.name(), "block");
    assert_eq!(
        third.kernel_push,
        Some(KernelPush {
            action: KernelAction::Deny,
            prefix: Some("192.0.2.1/32".into()),
            ttl_seconds: Some(60),
            reason: Some("denylist: 3 blocks within 60s".into()),
        })
    );
    // The count starts over after a push.
    assert!(
        answer(&a, "192.0.2.1", "/admin", at(4))
            .kernel_push
            .is_none()
    );

    // IPv6 clients get their /128; a cap above our TTL leaves ours.
    a.on_configure(&configure(json!({}), Some(86_400)))
        .await
        .unwrap();
    let mut last = None;
    for s in 0..3 {
        last = answer(&a, "2001:db8::7", "/admin", at(10 + s)).kernel_push;
    }
    let push = last.unwrap();
    assert_eq!(push.prefix.as_deref(), Some("2001:db8::7/128"));
    assert_eq!(push.ttl_seconds, Some(600));
}

#[tokio::test]
async fn blocks_spread_wider_than_the_window_are_not_an_offence() {
    let a = agent(&[], &["192.0.2.0/24"], POLICY);
    a.on_configure(&configure(json!({}), Some(3600)))
        .await
        .unwrap();
    let t0 = Instant::now();
    for s in [0, 30, 61, 100, 125, 190] {
        let r = answer(&a, "192.0.2.9", "/", t0 + Duration::from_secs(s));
        assert!(r.kernel_push.is_none(), "pushed at {s} s");
    }
}

#[tokio::test]
async fn zero_disables_pushes_and_does_not_accept_the_extension() {
    let a = agent(&["/admin"], &[], KernelPolicy { after: 0, ..POLICY });
    assert!(a.extensions().is_empty());
    a.on_configure(&configure(json!({}), Some(3600)))
        .await
        .unwrap();
    for _ in 0..10 {
        assert!(
            answer(&a, "192.0.2.1", "/admin", Instant::now())
                .kernel_push
                .is_none()
        );
    }
    assert!(a.offenders.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_zero_cap_means_no_push() {
    let a = agent(&["/admin"], &[], KernelPolicy { after: 1, ..POLICY });
    a.on_configure(&configure(json!({}), Some(0)))
        .await
        .unwrap();
    let r = answer(&a, "192.0.2.1", "/admin", Instant::now());
    assert_eq!(r.decision.name(), "block");
    assert!(r.kernel_push.is_none());
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    denylist: DenylistArgs,
}

#[test]
fn flags_and_files_make_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deny.txt");
    std::fs::write(&file, "/from-file\n203.0.113.0/24\n").unwrap();
    let cli = Cli::try_parse_from([
        "sentinel-denylist-agent",
        "--socket",
        "/run/d.sock",
        "--block-path",
        "/admin",
        "--block-path",
        "/.git/",
        "--block-ip",
        "192.0.2.1",
        "--block-file",
        file.to_str().unwrap(),
        "--kernel-after",
        "2",
        "--kernel-window-seconds",
        "30",
        "--kernel-ttl-seconds",
        "120",
    ])
    .unwrap();
    let rules = cli.denylist.rules().unwrap();
    assert_eq!(rules.paths, ["/admin", "/.git/", "/from-file"]);
    assert_eq!(rules.nets.len(), 2);
    assert_eq!(
        cli.denylist.kernel_policy(),
        KernelPolicy {
            after: 2,
            window: Duration::from_secs(30),
            ttl_seconds: 120
        }
    );

    let defaults = Cli::try_parse_from(["d", "--socket", "/s"])
        .unwrap()
        .denylist;
    assert_eq!(
        defaults.kernel_policy(),
        KernelPolicy {
            after: 5,
            window: Duration::from_secs(60),
            ttl_seconds: 600
        }
    );
    assert!(defaults.rules().unwrap().is_empty());

    let bad = Cli::try_parse_from(["d", "--socket", "/s", "--block-path", "admin"]).unwrap();
    assert!(matches!(bad.denylist.rules(), Err(RuleError::Path { .. })));
}
