//! Reading `kernel { steering { rule ... } }`: which destinations the
//! sk_lookup program sends to which listener.

use std::net::SocketAddr;

use ipnet::IpNet;
use kdl::{KdlNode, KdlValue};

use super::{
    Config, SteeringRule,
    refs::{Kind, Names},
    walk::{self, Walker, span::Span},
};
use crate::{
    kernel::steer::SteerProtocol,
    net::{RuleList, validate_prefix},
};

/// Rules the kernel program holds, less one per listener that the
/// quarantine path may add for the listeners' own addresses.
pub const MAX_STEERING_RULES: usize = 32;

const RULE_PROPERTIES: &[&str] = &["listener", "prefix", "ports", "protocol"];

/// `steering { rule listener="http" prefix="198.51.100.0/24" ports="1-65535" protocol="tcp" }`.
pub(super) fn steering(
    w: &mut Walker<'_>,
    node: &KdlNode,
    out: &mut Vec<SteeringRule>,
    names: &mut Names,
) {
    w.block(node, &["rule"], |w, name, child| {
        if name != "rule" {
            return false;
        }
        if let Some(rule) = rule(w, child, names) {
            if out.iter().any(|r| {
                r.prefix == rule.prefix && r.ports == rule.ports && r.protocol == rule.protocol
            }) {
                w.error(
                    child,
                    format!(
                        "steering rule for {} ports {}-{} is listed twice",
                        rule.prefix, rule.ports.0, rule.ports.1
                    ),
                );
            } else if out.len() == MAX_STEERING_RULES {
                w.error(
                    child,
                    format!("at most {MAX_STEERING_RULES} steering rules can be configured"),
                );
            } else {
                out.push(rule);
                names.steering_rules.push(child.offset());
            }
        }
        true
    });
}

fn rule(w: &mut Walker<'_>, node: &KdlNode, names: &mut Names) -> Option<SteeringRule> {
    let mut listener = None;
    let mut prefix: Option<IpNet> = None;
    let mut ports = None;
    let mut protocol = SteerProtocol::Tcp;
    let mut ok = true;
    for entry in node.entries() {
        let Some(key) = entry.name().map(|n| n.value()) else {
            w.error(
                entry,
                "'rule' takes properties: listener=, prefix=, ports= and protocol=",
            );
            ok = false;
            continue;
        };
        match key {
            "listener" => {
                if let Some(name) = w.entry_string("listener", entry) {
                    names.refer(Kind::Listener, &name, entry.offset(), "steering rule");
                    listener = Some(name);
                }
            }
            "prefix" => {
                if let Some(text) = w.entry_string("prefix", entry) {
                    match validate_prefix(&text, RuleList::Allow) {
                        Ok(net) => prefix = Some(net),
                        Err(e) => {
                            w.error(entry, e.to_string());
                            ok = false;
                        }
                    }
                }
            }
            "ports" => match super::port_range(entry.value()) {
                Ok(range) => ports = Some(range),
                Err(msg) => {
                    w.error(entry, format!("'ports': {msg}"));
                    ok = false;
                }
            },
            "protocol" => match entry.value() {
                KdlValue::String(s) if s == "tcp" => protocol = SteerProtocol::Tcp,
                KdlValue::String(s) if s == "udp" => {
                    // Every listener is a TCP socket; the kernel refuses to
                    // hand a UDP datagram to one.
                    w.error(
                        entry,
                        "protocol \"udp\" cannot be steered: listeners accept TCP only",
                    );
                    ok = false;
                }
                other => {
                    w.error(
                        entry,
                        format!(
                            "'protocol' must be \"tcp\", found {}",
                            match other {
                                KdlValue::String(s) => format!("\"{s}\""),
                                v => walk::kind(v).to_owned(),
                            }
                        ),
                    );
                    ok = false;
                }
            },
            other => {
                let msg = match walk::did_you_mean(other, RULE_PROPERTIES) {
                    Some(best) => format!("unknown property '{other}' (did you mean '{best}'?)"),
                    None => format!("unknown property '{other}'"),
                };
                w.error(entry, msg);
                ok = false;
            }
        }
    }
    for (property, present) in [
        ("listener", listener.is_some()),
        ("prefix", prefix.is_some()),
        ("ports", ports.is_some()),
    ] {
        if !present && ok && !has_property(node, property) {
            w.error(node, format!("steering rule needs {property}="));
        }
    }
    if !node.children().is_none_or(|c| c.nodes().is_empty()) {
        w.error(node, "'rule' takes properties, not a block");
    }
    Some(SteeringRule {
        listener: listener?,
        prefix: prefix?,
        ports: ports?,
        protocol,
    })
}

fn has_property(node: &KdlNode, name: &str) -> bool {
    node.entries()
        .iter()
        .any(|e| e.name().is_some_and(|n| n.value() == name))
}

/// Reports steering the kernel could never carry out. `bpf_sk_assign`
/// hands a connection only to a socket of its own family or to a
/// dual-stack IPv6 socket; for an IPv4 socket and an IPv6 connection it
/// answers EAFNOSUPPORT, and the connection would silently go to the
/// kernel's own lookup instead (counted as `no_socket`).
pub(super) fn check_families(w: &mut Walker<'_>, config: &Config, names: &Names) {
    let address = |name: &str| {
        config
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.address)
    };
    for (rule, at) in config.kernel.steering.iter().zip(&names.steering_rules) {
        if let (IpNet::V6(_), Some(bound @ SocketAddr::V4(_))) =
            (rule.prefix, address(&rule.listener))
        {
            w.at_offset(
                *at,
                format!(
                    "steering rule for {}: listener '{}' is bound to the IPv4 address {bound}, \
                     which cannot take IPv6 connections; bind it to an IPv6 address \
                     (\"[::]:{}\" takes both families)",
                    rule.prefix,
                    rule.listener,
                    bound.port()
                ),
            );
        }
    }
    let Some(quarantine) = config.listeners.iter().find(|l| l.quarantine) else {
        return;
    };
    let (SocketAddr::V4(bound), Some(at)) = (quarantine.address, names.quarantine_at) else {
        return;
    };
    // With a quarantine listener every other listener's own address is
    // steered as well, so an IPv6 listener steers IPv6 connections too.
    let v6 = config
        .kernel
        .steering
        .iter()
        .find(|r| matches!(r.prefix, IpNet::V6(_)))
        .map(|r| format!("the steering rule for {}", r.prefix))
        .or_else(|| {
            config
                .listeners
                .iter()
                .find(|l| !l.quarantine && l.address.is_ipv6())
                .map(|l| format!("listener '{}' ({})", l.name, l.address))
        });
    if let Some(v6) = v6 {
        w.at_offset(
            at,
            format!(
                "quarantine listener '{}' is bound to the IPv4 address {bound}, which cannot \
                 take the IPv6 connections of watchlisted sources that {v6} steers; bind it \
                 to \"[::]:{}\" to quarantine both families",
                quarantine.name,
                bound.port()
            ),
        );
    }
}
