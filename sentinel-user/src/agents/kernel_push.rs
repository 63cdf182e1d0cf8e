//! From an agent's verdict to the kernel: an answer's `kernel_push` asks
//! for the client to be denied in XDP or watched (its connections steered
//! to the quarantine listener), and is applied only within the agent's
//! `kernel-push { ... }` limits, the same for both actions.
//!
//! The guards, in order: the agent's configuration allows pushes; the
//! prefix parses, contains the client's address and is no broader than
//! `min-prefix-length-v4`/`-v6`; it does not cover the host's own loopback
//! address; neither the client nor any allowlist entry inside the prefix is
//! allowlisted; an entry an operator wrote (config, admin) is never
//! replaced. The TTL is the asked one, capped at `max-ttl-seconds`, which
//! is also the default.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use sentinel_agent_protocol::{KernelAction, KernelPush};
use tracing::{info, warn};

use super::metrics::AgentMetrics;
use crate::{config::KernelPushConfig, net::RuleList};

/// What the daemon's kernel state offers the proxy.
pub trait KernelBridge: Send + Sync {
    /// Whether `ip` lies in a live allowlist entry, or `prefix` contains
    /// one.
    fn allowlisted(&self, ip: IpAddr, prefix: &IpNet) -> bool;

    /// Adds or extends a deny entry written by `source`, unless an entry
    /// for exactly `prefix` was written by someone else (config, admin):
    /// `Ok(false)` then.
    fn deny(
        &self,
        prefix: &IpNet,
        ttl: Duration,
        source: &str,
        reason: &str,
    ) -> Result<bool, String>;

    /// Adds or extends a watchlist entry written by `source`, with the same
    /// rule about operators' entries as [`Self::deny`]. `Ok(None)` when no
    /// quarantine listener is configured, so a watch would steer nothing.
    fn watch(
        &self,
        _prefix: &IpNet,
        _ttl: Duration,
        _source: &str,
        _reason: &str,
    ) -> Result<Option<bool>, String> {
        Ok(None)
    }
}

/// The `result` label of `sentinel_kernel_push_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushResult {
    Applied,
    /// Monitor mode: every guard passed, nothing was written.
    WouldApply,
    RefusedNotAllowed,
    RefusedPrefix,
    RefusedAllowlisted,
    /// An operator's entry for the same prefix exists.
    RefusedExisting,
    /// `watch` needs a quarantine listener, and none is configured.
    Unsupported,
    Error,
}

impl PushResult {
    pub const fn label(self) -> &'static str {
        match self {
            PushResult::Applied => "applied",
            PushResult::WouldApply => "would_apply",
            PushResult::RefusedNotAllowed => "refused_not_allowed",
            PushResult::RefusedPrefix => "refused_prefix",
            PushResult::RefusedAllowlisted => "refused_allowlisted",
            PushResult::RefusedExisting => "refused_existing",
            PushResult::Unsupported => "unsupported",
            PushResult::Error => "error",
        }
    }
}

/// A push that passed the checks that need no kernel access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub prefix: IpNet,
    pub ttl: Duration,
    pub reason: String,
}

/// The checks of the module comment that need no kernel state.
pub fn check(
    push: &KernelPush,
    limits: Option<&KernelPushConfig>,
    client: IpAddr,
) -> Result<Checked, PushResult> {
    let Some(limits) = limits else {
        return Err(PushResult::RefusedNotAllowed);
    };
    let client = canonical(client);
    let prefix = match &push.prefix {
        None => IpNet::from(client),
        Some(text) => match text.trim().parse::<IpNet>() {
            Ok(p) => p,
            Err(_) => match text.trim().parse::<IpAddr>() {
                Ok(ip) => IpNet::from(canonical(ip)),
                Err(_) => return Err(PushResult::RefusedPrefix),
            },
        },
    };
    // Host bits are forgiven (an agent naming "203.0.113.7/24" means the
    // /24), but the prefix must be the client's.
    let prefix = prefix.trunc();
    let min = match prefix {
        IpNet::V4(_) => limits.min_prefix_len_v4,
        IpNet::V6(_) => limits.min_prefix_len_v6,
    };
    if prefix.prefix_len() < min || !prefix.contains(&client) {
        return Err(PushResult::RefusedPrefix);
    }
    if prefix.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST))
        || prefix.contains(&IpAddr::V6(Ipv6Addr::LOCALHOST))
    {
        return Err(PushResult::RefusedPrefix);
    }
    let ttl = push
        .ttl_seconds
        .filter(|s| *s > 0)
        .map_or(limits.max_ttl, Duration::from_secs)
        .min(limits.max_ttl);
    let reason = push
        .reason
        .clone()
        .unwrap_or_else(|| "pushed by an agent".to_owned());
    // The kernel stores at most REASON_LEN bytes, cut on a char boundary.
    let mut reason = reason;
    let max = sentinel_common::REASON_LEN;
    if reason.len() > max {
        let mut cut = max;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    Ok(Checked {
        prefix,
        ttl,
        reason,
    })
}

/// An IPv4 client seen as `::ffff:a.b.c.d` on a dual-stack socket is the
/// IPv4 address the XDP program sees.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Applies `push` for `agent` (or, with `enforce` false, only checks it),
/// counts the result and logs it. Runs the kernel work off the async
/// workers.
pub async fn apply(
    bridge: Option<Arc<dyn KernelBridge>>,
    metrics: &AgentMetrics,
    agent: &str,
    limits: Option<&KernelPushConfig>,
    push: &KernelPush,
    client: IpAddr,
    enforce: bool,
) -> PushResult {
    let action = push.action;
    let result = match bridge {
        None => PushResult::Error,
        Some(bridge) => match check(push, limits, client) {
            Err(refused) => refused,
            Ok(checked) => {
                let source = format!("agent:{agent}");
                let enforced = enforce;
                let done = tokio::task::spawn_blocking(move || {
                    if bridge.allowlisted(canonical(client), &checked.prefix) {
                        return (PushResult::RefusedAllowlisted, checked);
                    }
                    if !enforced {
                        return (PushResult::WouldApply, checked);
                    }
                    let (prefix, ttl, reason) = (&checked.prefix, checked.ttl, &checked.reason);
                    let outcome = match action {
                        KernelAction::Deny => bridge.deny(prefix, ttl, &source, reason).map(Some),
                        KernelAction::Watch => bridge.watch(prefix, ttl, &source, reason),
                    };
                    let r = match outcome {
                        Ok(Some(true)) => PushResult::Applied,
                        Ok(Some(false)) => PushResult::RefusedExisting,
                        Ok(None) => PushResult::Unsupported,
                        Err(e) => {
                            warn!(%e, prefix = %checked.prefix, "kernel push failed");
                            PushResult::Error
                        }
                    };
                    (r, checked)
                })
                .await;
                match done {
                    Ok((r, checked)) => {
                        if matches!(r, PushResult::Applied | PushResult::WouldApply) {
                            info!(
                                agent,
                                prefix = %checked.prefix,
                                ttl_secs = checked.ttl.as_secs(),
                                reason = %checked.reason,
                                result = r.label(),
                                action = match action {
                                    KernelAction::Deny => "deny",
                                    KernelAction::Watch => "watch",
                                },
                                "kernel push by an agent"
                            );
                        }
                        r
                    }
                    Err(_) => PushResult::Error,
                }
            }
        },
    };
    if !matches!(result, PushResult::Applied | PushResult::WouldApply) {
        warn!(agent, %client, result = result.label(), "kernel push not applied");
    }
    metrics
        .kernel_push
        .with_label_values(&[agent, result.label()])
        .inc();
    result
}

/// The deny list an agent push writes to.
pub const PUSH_LIST: RuleList = RuleList::Deny;

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> KernelPushConfig {
        KernelPushConfig {
            max_ttl: Duration::from_secs(600),
            min_prefix_len_v4: 24,
            min_prefix_len_v6: 64,
        }
    }

    fn push(prefix: Option<&str>, ttl: Option<u64>) -> KernelPush {
        KernelPush {
            action: KernelAction::Deny,
            prefix: prefix.map(str::to_owned),
            ttl_seconds: ttl,
            reason: None,
        }
    }

    fn client() -> IpAddr {
        "203.0.113.7".parse().unwrap()
    }

    #[test]
    fn defaults_to_the_client_host_and_the_max_ttl() {
        let c = check(&push(None, None), Some(&limits()), client()).unwrap();
        assert_eq!(c.prefix, "203.0.113.7/32".parse::<IpNet>().unwrap());
        assert_eq!(c.ttl, Duration::from_secs(600));
        let c = check(&push(None, Some(60)), Some(&limits()), client()).unwrap();
        assert_eq!(c.ttl, Duration::from_secs(60));
        let c = check(&push(None, Some(86_400)), Some(&limits()), client()).unwrap();
        assert_eq!(c.ttl, Duration::from_secs(600), "capped at the maximum");
    }

    #[test]
    fn refuses_what_the_limits_do_not_allow() {
        assert_eq!(
            check(&push(None, None), None, client()),
            Err(PushResult::RefusedNotAllowed)
        );
        for bad in [
            "203.0.112.0/23",
            "198.51.100.0/24",
            "not a prefix",
            "0.0.0.0/0",
        ] {
            assert_eq!(
                check(&push(Some(bad), None), Some(&limits()), client()),
                Err(PushResult::RefusedPrefix),
                "{bad}"
            );
        }
        let c = check(
            &push(Some("203.0.113.99/24"), None),
            Some(&limits()),
            client(),
        )
        .unwrap();
        assert_eq!(c.prefix, "203.0.113.0/24".parse::<IpNet>().unwrap());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let wide = KernelPushConfig {
            min_prefix_len_v4: 8,
            ..limits()
        };
        assert_eq!(
            check(&push(None, None), Some(&wide), lo),
            Err(PushResult::RefusedPrefix)
        );
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        assert_eq!(
            check(&push(Some("2001:db8::/48"), None), Some(&limits()), v6),
            Err(PushResult::RefusedPrefix)
        );
        let c = check(&push(Some("2001:db8::/64"), None), Some(&limits()), v6).unwrap();
        assert_eq!(c.prefix.prefix_len(), 64);
    }

    #[test]
    fn mapped_ipv4_clients_are_pushed_as_ipv4() {
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        let c = check(&push(None, None), Some(&limits()), mapped).unwrap();
        assert_eq!(c.prefix, "203.0.113.7/32".parse::<IpNet>().unwrap());
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let mut p = push(None, None);
        p.reason = Some("é".repeat(100));
        let c = check(&p, Some(&limits()), client()).unwrap();
        assert!(c.reason.len() <= sentinel_common::REASON_LEN);
        assert!(c.reason.chars().all(|ch| ch == 'é'));
    }

    /// Records what it was asked; `steering` says whether a quarantine
    /// listener exists.
    struct Recorder {
        steering: bool,
        calls: std::sync::Mutex<Vec<(&'static str, IpNet)>>,
    }

    impl KernelBridge for Recorder {
        fn allowlisted(&self, _ip: IpAddr, _prefix: &IpNet) -> bool {
            false
        }
        fn deny(&self, prefix: &IpNet, _: Duration, _: &str, _: &str) -> Result<bool, String> {
            self.calls.lock().unwrap().push(("deny", *prefix));
            Ok(true)
        }
        fn watch(
            &self,
            prefix: &IpNet,
            _: Duration,
            _: &str,
            _: &str,
        ) -> Result<Option<bool>, String> {
            if !self.steering {
                return Ok(None);
            }
            self.calls.lock().unwrap().push(("watch", *prefix));
            Ok(Some(true))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn watch_pushes_go_to_the_watchlist_under_the_same_guards() {
        let metrics = AgentMetrics::new(&prometheus::Registry::new());
        let mut watch = push(None, Some(60));
        watch.action = KernelAction::Watch;
        for (steering, want) in [
            (true, PushResult::Applied),
            (false, PushResult::Unsupported),
        ] {
            let bridge = Arc::new(Recorder {
                steering,
                calls: Default::default(),
            });
            let limits = limits();
            let got = apply(
                Some(bridge.clone() as Arc<dyn KernelBridge>),
                &metrics,
                "waf",
                Some(&limits),
                &watch,
                client(),
                true,
            )
            .await;
            assert_eq!(got, want);
            let calls = bridge.calls.lock().unwrap().clone();
            if steering {
                assert_eq!(calls, vec![("watch", IpNet::from(client()))]);
            } else {
                assert!(calls.is_empty());
            }
        }
        // The prefix guard applies to watch as to deny.
        let mut broad = push(Some("0.0.0.0/0"), None);
        broad.action = KernelAction::Watch;
        let bridge = Arc::new(Recorder {
            steering: true,
            calls: Default::default(),
        });
        let limits = limits();
        let got = apply(
            Some(bridge.clone() as Arc<dyn KernelBridge>),
            &metrics,
            "waf",
            Some(&limits),
            &broad,
            client(),
            true,
        )
        .await;
        assert_eq!(got, PushResult::RefusedPrefix);
        assert!(bridge.calls.lock().unwrap().is_empty());
        // Without kernel-push in the agent's configuration: refused.
        let got = apply(
            Some(bridge.clone() as Arc<dyn KernelBridge>),
            &metrics,
            "waf",
            None,
            &watch,
            client(),
            true,
        )
        .await;
        assert_eq!(got, PushResult::RefusedNotAllowed);
    }
}
