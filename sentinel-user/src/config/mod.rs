//! Configuration: KDL in the seed's style (`sentinel-agents-config.txt`),
//! read with the `kdl` crate. Every problem in a file is reported at once,
//! each with its file, line and column.
//!
//! Defaults are written once, next to the field they belong to, and listed
//! in docs/configuration.md.

mod agents;
mod files;
mod profile;
mod proxy;
mod read_agents;
mod read_listeners;
mod read_profile;
mod read_proxy;
mod read_steering;
mod read_upstreams;
mod refs;
mod walk;

pub use agents::*;
pub use profile::*;
pub use proxy::*;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use kdl::{KdlDocument, KdlNode, KdlValue};

pub use walk::{Problem, Source};
use walk::{Walker, span::Span};

use crate::net::{RuleList, validate_prefix};

/// Errors from loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(.problems))]
    Invalid { problems: Vec<Problem> },
}

/// One problem per line, `file:line:column: message`.
fn render(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    lines.join("\n")
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub system: SystemConfig,
    pub listeners: Vec<ListenerConfig>,
    /// In file order; the router sorts them by priority.
    pub routes: Vec<RouteConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub filters: Vec<FilterConfig>,
    pub agents: Vec<AgentConfig>,
    pub waf: WafConfig,
    pub limits: LimitsConfig,
    pub observability: ObservabilityConfig,
    pub kernel: KernelConfig,
    pub admin: AdminConfig,
    pub profile: ProfileConfig,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works on every interface, after the skb exists.
    Generic,
}

impl XdpMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

/// Capacities of the kernel maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub denylist_v4: u32,
    pub denylist_v6: u32,
    pub allowlist_v4: u32,
    pub allowlist_v6: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            denylist_v4: sentinel_common::DEFAULT_DENY_V4_ENTRIES,
            denylist_v6: sentinel_common::DEFAULT_DENY_V6_ENTRIES,
            allowlist_v4: sentinel_common::DEFAULT_ALLOW_V4_ENTRIES,
            allowlist_v6: sentinel_common::DEFAULT_ALLOW_V6_ENTRIES,
        }
    }
}

/// An allowlist or denylist entry written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticRule {
    pub prefix: IpNet,
    pub reason: String,
}

/// Destination ports dropped at XDP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPolicy {
    pub deny_tcp: Vec<(u16, u16)>,
    pub deny_udp: Vec<(u16, u16)>,
}

/// `kernel { steering { rule ... } }`: connections to `prefix`, on ports
/// `ports.0..=ports.1`, over `protocol`, are handed to `listener`'s socket
/// by the sk_lookup program, whatever address and port it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteeringRule {
    pub listener: String,
    pub prefix: IpNet,
    pub ports: (u16, u16),
    /// Default: TCP (the only protocol listeners accept).
    pub protocol: crate::kernel::steer::SteerProtocol,
}

/// The `kernel { ... }` block.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelConfig {
    /// Interfaces the XDP program is attached to. Default: none (maps and
    /// the admin API still work; nothing is filtered).
    pub interfaces: Vec<String>,
    /// Default: `auto`.
    pub xdp_mode: XdpMode,
    /// Directory on a bpffs where the shared maps are pinned.
    /// Default: `/sys/fs/bpf/sentinel`.
    pub pin_path: PathBuf,
    pub capacity: Capacity,
    /// TTL given to a deny or allow entry added without one; 0 means the
    /// entry never expires. Default: 0.
    pub default_ttl_seconds: u64,
    /// Longest TTL accepted from the CLI or an agent. Default: 30 days.
    pub max_ttl_seconds: u64,
    /// How often userspace removes expired entries. The program ignores
    /// expired entries itself, so this only bounds how long they occupy
    /// memory and listings. Default: 1000 ms.
    pub reap_interval_ms: u64,
    pub allowlist: Vec<StaticRule>,
    pub denylist: Vec<StaticRule>,
    pub port_policy: PortPolicy,
    /// Steering rules, most specific first at run time. Default: none (the
    /// sk_lookup program is not attached unless a listener is the
    /// quarantine one).
    pub steering: Vec<SteeringRule>,
}

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/sentinel";
pub const DEFAULT_MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// Upper bound of `max-ttl-seconds`: ten years.
pub const MAX_TTL_CEILING_SECONDS: u64 = 10 * 365 * 24 * 3600;

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            xdp_mode: XdpMode::Auto,
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            capacity: Capacity::default(),
            default_ttl_seconds: 0,
            max_ttl_seconds: DEFAULT_MAX_TTL_SECONDS,
            reap_interval_ms: 1000,
            allowlist: Vec::new(),
            denylist: Vec::new(),
            port_policy: PortPolicy::default(),
            steering: Vec::new(),
        }
    }
}

/// The `admin { ... }` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Unix socket of the admin API (mode 0600). Default:
    /// `/run/sentinel/admin.sock`.
    pub socket: PathBuf,
}

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sentinel/admin.sock";

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
        }
    }
}

/// The `observability { ... }` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservabilityConfig {
    /// Address of the Prometheus endpoint (`/metrics`); `None` disables it.
    /// Default: `127.0.0.1:9090`.
    pub metrics_address: Option<SocketAddr>,
    /// `logging { access-log #true format "json" }`.
    pub access_log: AccessLog,
}

/// Format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable key=value lines. Default.
    Text,
    /// One JSON object per line.
    Json,
}

/// The access log: one line per request through tracing (target
/// `sentinel::access`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// Default: true.
    pub enabled: bool,
    /// Default: `Text`.
    pub format: LogFormat,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            enabled: true,
            format: LogFormat::Text,
        }
    }
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            metrics_address: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            access_log: AccessLog::default(),
        }
    }
}

const TOP_LEVEL: &[&str] = &[
    "system",
    "listeners",
    "routes",
    "upstreams",
    "filters",
    "agents",
    "waf",
    "limits",
    "observability",
    "kernel",
    "admin",
    "profile",
];

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&Source::new(path, &text))
    }

    /// Parses and validates configuration text.
    pub fn parse(source: &Source) -> Result<Self, ConfigError> {
        let mut walker = Walker::new(source);
        let doc = match source.text.parse::<KdlDocument>() {
            Ok(doc) => doc,
            Err(error) => {
                for diag in &error.diagnostics {
                    let message = diag
                        .message
                        .clone()
                        .or_else(|| diag.label.clone())
                        .unwrap_or_else(|| "invalid KDL".to_owned());
                    let message = match &diag.help {
                        Some(help) => format!("{message} ({help})"),
                        None => message,
                    };
                    walker.at_offset(diag.span.offset(), message);
                }
                if walker.problems.is_empty() {
                    walker.at_offset(0, "invalid KDL document");
                }
                return Err(ConfigError::Invalid {
                    problems: walker.problems,
                });
            }
        };

        let mut config = Config::default();
        let mut names = refs::Names::default();
        let mut seen: Vec<String> = Vec::new();
        for node in doc.nodes() {
            let name = node.name().value();
            if TOP_LEVEL.contains(&name) {
                if seen.iter().any(|s| s == name) {
                    walker.error(node, format!("block '{name}' appears more than once"));
                    continue;
                }
                seen.push(name.to_owned());
            }
            let w = &mut walker;
            match name {
                "system" => read_proxy::system(w, node, &mut config.system),
                "listeners" => {
                    read_listeners::listeners(w, node, &mut config.listeners, &mut names)
                }
                "routes" => read_proxy::routes(w, node, &mut config.routes, &mut names),
                "upstreams" => {
                    read_upstreams::upstreams(w, node, &mut config.upstreams, &mut names)
                }
                "filters" => read_agents::filters(w, node, &mut config.filters, &mut names),
                "agents" => read_agents::agents(w, node, &mut config.agents, &mut names),
                "waf" => read_agents::waf(w, node, &mut config.waf),
                "limits" => read_proxy::limits(w, node, &mut config.limits),
                "observability" => observability(w, node, &mut config.observability),
                "kernel" => kernel(w, node, &mut config.kernel, &mut names),
                "admin" => admin(w, node, &mut config.admin),
                "profile" => read_profile::profile(w, node, &mut config.profile),
                _ => w.unknown(node, "block", TOP_LEVEL),
            }
        }
        names.check(&mut walker);
        read_steering::check_families(&mut walker, &config, &names);
        // In file order, whichever check found them.
        walker.problems.sort_by_key(|p| (p.line, p.column));
        if walker.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                problems: walker.problems,
            })
        }
    }
}

const KERNEL_OPTIONS: &[&str] = &[
    "interfaces",
    "xdp-mode",
    "pin-path",
    "capacity",
    "default-ttl-seconds",
    "max-ttl-seconds",
    "reap-interval-ms",
    "allowlist",
    "denylist",
    "port-policy",
    "steering",
];

fn kernel(w: &mut Walker<'_>, node: &KdlNode, out: &mut KernelConfig, names: &mut refs::Names) {
    let mut default_ttl_at = None;
    w.block(node, KERNEL_OPTIONS, |w, name, child| {
        match name {
            "interfaces" => {
                out.interfaces.clear();
                for (iface, offset) in w.strings(child) {
                    if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']) {
                        w.at_offset(offset, format!("'{iface}' is not a valid interface name"));
                    } else if out.interfaces.contains(&iface) {
                        w.at_offset(offset, format!("interface '{iface}' is listed twice"));
                    } else {
                        out.interfaces.push(iface);
                    }
                }
            }
            "xdp-mode" => {
                if let Some(mode) = w.string(child) {
                    match mode.as_str() {
                        "auto" => out.xdp_mode = XdpMode::Auto,
                        "native" => out.xdp_mode = XdpMode::Native,
                        "generic" => out.xdp_mode = XdpMode::Generic,
                        other => w.error(
                            child,
                            format!("'xdp-mode' must be \"auto\", \"native\" or \"generic\", found \"{other}\""),
                        ),
                    }
                }
            }
            "pin-path" => {
                if let Some(path) = w.string(child) {
                    let path = PathBuf::from(path);
                    if path.is_absolute() {
                        out.pin_path = path;
                    } else {
                        w.error(child, "'pin-path' must be an absolute path");
                    }
                }
            }
            "capacity" => capacity(w, child, &mut out.capacity),
            "default-ttl-seconds" => {
                if let Some(v) = w.integer(child, 0, MAX_TTL_CEILING_SECONDS) {
                    out.default_ttl_seconds = v;
                    default_ttl_at = Some(child.offset());
                }
            }
            "max-ttl-seconds" => {
                if let Some(v) = w.integer(child, 1, MAX_TTL_CEILING_SECONDS) {
                    out.max_ttl_seconds = v;
                }
            }
            "reap-interval-ms" => {
                if let Some(v) = w.integer(child, 10, 3_600_000) {
                    out.reap_interval_ms = v;
                }
            }
            "allowlist" => out.allowlist = rules(w, child, RuleList::Allow),
            "denylist" => out.denylist = rules(w, child, RuleList::Deny),
            "port-policy" => port_policy(w, child, &mut out.port_policy),
            "steering" => read_steering::steering(w, child, &mut out.steering, names),
            _ => return false,
        }
        true
    });
    if let Some(at) = default_ttl_at
        && out.default_ttl_seconds > out.max_ttl_seconds
    {
        w.at_offset(
            at,
            format!(
                "'default-ttl-seconds' ({}) is longer than 'max-ttl-seconds' ({})",
                out.default_ttl_seconds, out.max_ttl_seconds
            ),
        );
    }
}

fn capacity(w: &mut Walker<'_>, node: &KdlNode, out: &mut Capacity) {
    const OPTIONS: &[&str] = &["denylist-v4", "denylist-v6", "allowlist-v4", "allowlist-v6"];
    // Hash maps allocate per entry, but the prefix indexes' arrays are
    // allocated whole (152 bytes per IPv4 entry of capacity, 32 per IPv6
    // one; docs/configuration.md): the ceiling keeps a typo from asking for
    // more than memory can hold.
    const MAX: u64 = 16 * 1024 * 1024;
    w.block(node, OPTIONS, |w, name, child| {
        let slot = match name {
            "denylist-v4" => &mut out.denylist_v4,
            "denylist-v6" => &mut out.denylist_v6,
            "allowlist-v4" => &mut out.allowlist_v4,
            "allowlist-v6" => &mut out.allowlist_v6,
            _ => return false,
        };
        if let Some(v) = w.integer(child, 1, MAX) {
            *slot = v as u32;
        }
        true
    });
}

/// `allowlist { prefix "10.0.0.0/8" reason="..." }`.
fn rules(w: &mut Walker<'_>, node: &KdlNode, list: RuleList) -> Vec<StaticRule> {
    let mut out: Vec<StaticRule> = Vec::new();
    w.block(node, &["prefix"], |w, name, child| {
        if name != "prefix" {
            return false;
        }
        let mut prefix = None;
        let mut reason = String::from("config");
        let mut positional = 0;
        for entry in child.entries() {
            match entry.name().map(|n| n.value()) {
                None => {
                    positional += 1;
                    if positional > 1 {
                        w.error(
                            entry,
                            "'prefix' takes one CIDR; write one 'prefix' per entry",
                        );
                        continue;
                    }
                    let Some(text) = w.entry_string("prefix", entry) else {
                        continue;
                    };
                    match validate_prefix(&text, list) {
                        Ok(net) => prefix = Some(net),
                        Err(e) => w.error(entry, e.to_string()),
                    }
                }
                Some("reason") => {
                    if let Some(r) = w.entry_string("reason", entry) {
                        reason = r;
                    }
                }
                Some(other) => {
                    let msg = match walk::did_you_mean(other, &["reason"]) {
                        Some(best) => {
                            format!("unknown property '{other}' (did you mean '{best}'?)")
                        }
                        None => format!("unknown property '{other}'"),
                    };
                    w.error(entry, msg);
                }
            }
        }
        if positional == 0 {
            w.error(child, "'prefix' needs a CIDR such as \"192.0.2.0/24\"");
        }
        if let Some(prefix) = prefix {
            if out.iter().any(|r| r.prefix == prefix) {
                w.error(child, format!("prefix {prefix} is listed twice"));
            } else {
                out.push(StaticRule { prefix, reason });
            }
        }
        true
    });
    out
}

/// `port-policy { deny-tcp 23 "6000-6063"; deny-udp 19 }`.
fn port_policy(w: &mut Walker<'_>, node: &KdlNode, out: &mut PortPolicy) {
    w.block(node, &["deny-tcp", "deny-udp"], |w, name, child| {
        let slot = match name {
            "deny-tcp" => &mut out.deny_tcp,
            "deny-udp" => &mut out.deny_udp,
            _ => return false,
        };
        if child.entries().is_empty() {
            w.error(
                child,
                format!("'{name}' needs at least one port or \"low-high\" range"),
            );
        }
        for entry in child.entries() {
            if entry.name().is_some() {
                w.error(entry, format!("'{name}' takes ports, not properties"));
                continue;
            }
            match port_range(entry.value()) {
                Ok(range) => slot.push(range),
                Err(msg) => w.error(entry, format!("'{name}': {msg}")),
            }
        }
        true
    });
}

fn port_range(value: &KdlValue) -> Result<(u16, u16), String> {
    let port = |v: i128| -> Result<u16, String> {
        u16::try_from(v)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{v} is not a port (1-65535)"))
    };
    match value {
        KdlValue::Integer(i) => port(*i).map(|p| (p, p)),
        KdlValue::String(s) => {
            let (lo, hi) = s
                .split_once('-')
                .ok_or_else(|| format!("\"{s}\" is not a \"low-high\" range"))?;
            let parse = |t: &str| -> Result<u16, String> {
                t.trim()
                    .parse::<i128>()
                    .map_err(|_| format!("\"{s}\" is not a \"low-high\" range"))
                    .and_then(port)
            };
            let (lo, hi) = (parse(lo)?, parse(hi)?);
            if lo > hi {
                return Err(format!("range \"{s}\" is empty (low above high)"));
            }
            Ok((lo, hi))
        }
        other => Err(format!(
            "expected a port or a \"low-high\" range, found {}",
            walk::kind(other)
        )),
    }
}

fn admin(w: &mut Walker<'_>, node: &KdlNode, out: &mut AdminConfig) {
    w.block(node, &["socket"], |w, name, child| {
        if name != "socket" {
            return false;
        }
        if let Some(path) = w.string(child) {
            let path = PathBuf::from(path);
            if path.is_absolute() {
                out.socket = path;
            } else {
                w.error(child, "'socket' must be an absolute path");
            }
        }
        true
    });
}

fn observability(w: &mut Walker<'_>, node: &KdlNode, out: &mut ObservabilityConfig) {
    w.options(node, &["metrics", "logging"], &[], |w, name, child| {
        match name {
            "metrics" => metrics(w, child, out),
            "logging" => logging(w, child, &mut out.access_log),
            _ => return false,
        }
        true
    });
}

fn metrics(w: &mut Walker<'_>, node: &KdlNode, out: &mut ObservabilityConfig) {
    let mut enabled = true;
    w.options(node, &["address", "enabled"], &[], |w, name, leaf| {
        match name {
            "address" => {
                if let Some(addr) = w.string(leaf) {
                    match addr.parse::<SocketAddr>() {
                        Ok(a) => out.metrics_address = Some(a),
                        Err(_) => w.error(
                            leaf,
                            format!("'address' must be IP:PORT such as \"127.0.0.1:9090\", found \"{addr}\""),
                        ),
                    }
                }
            }
            "enabled" => {
                if let Some(b) = w.boolean(leaf) {
                    enabled = b;
                }
            }
            _ => return false,
        }
        true
    });
    if !enabled {
        out.metrics_address = None;
    }
}

/// `logging { access-log #true; format "json" }`.
fn logging(w: &mut Walker<'_>, node: &KdlNode, out: &mut AccessLog) {
    w.options(node, &["access-log", "format"], &[], |w, name, leaf| {
        match name {
            "access-log" => {
                if let Some(b) = w.boolean(leaf) {
                    out.enabled = b;
                }
            }
            "format" => {
                let choices = [("text", LogFormat::Text), ("json", LogFormat::Json)];
                if let Some(f) = w.choice(leaf, &choices) {
                    out.format = f;
                }
            }
            _ => return false,
        }
        true
    });
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_agents;
#[cfg(test)]
mod tests_complete;
#[cfg(test)]
mod tests_proxy;
#[cfg(test)]
mod tests_steering;
