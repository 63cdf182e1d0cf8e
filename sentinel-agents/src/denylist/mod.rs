//! The denylist agent: blocks requests by path prefix or client network,
//! and asks the proxy to drop clients that keep getting blocked.
//!
//! Rules come from flags and files ([`DenylistArgs`]) and from the agent's
//! `config { ... }` block, sent in `configure`:
//!
//! ```kdl
//! config {
//!     paths "/admin" "/.git/"        // "paths": ["/admin", "/.git/"]
//!     ips "203.0.113.0/24"           // "ips": "203.0.113.0/24"
//! }
//! ```
//!
//! Each key takes one string or several; any other key refuses the
//! configuration. The block's rules replace those of the previous
//! `configure`; the flags' rules always apply.
//!
//! When the proxy's `configure` offers kernel pushes (the agent's
//! `kernel-push { ... }` block), a client blocked `--kernel-after` times
//! within `--kernel-window-seconds` gets a block answer that also asks for
//! its address (/32 or /128) to be denied in XDP for
//! `--kernel-ttl-seconds`, capped at the offered `max_ttl_seconds`.

mod offenders;
mod rules;

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Mutex, RwLock},
    time::{Duration, Instant},
};

pub use offenders::Offenders;
pub use rules::{CONFIG_IPS, CONFIG_PATHS, RuleError, Rules, normalize};
use sentinel_agent_sdk::{
    Agent, ConfigureError, ConfigureEvent, KernelPushLimits, RequestExt, RequestHeadersEvent,
    Verdict, async_trait, extensions,
};
use tracing::info;

/// Body of a block answer.
pub const BLOCK_BODY: &str = "Forbidden\n";

/// The denylist's own flags, next to the server's.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DenylistArgs {
    /// Block requests whose path starts with this prefix (repeatable).
    #[arg(long = "block-path", value_name = "PREFIX")]
    pub block_paths: Vec<String>,
    /// Block clients at this address or in this CIDR (repeatable).
    #[arg(long = "block-ip", value_name = "IP|CIDR")]
    pub block_ips: Vec<String>,
    /// Read entries from this file, one a line: a path prefix if it starts
    /// with '/', else an address or CIDR; '#' starts a comment (repeatable).
    #[arg(long = "block-file", value_name = "PATH")]
    pub block_files: Vec<PathBuf>,
    /// Blocks of one client within the window that get it denied in the
    /// kernel, when the proxy offers kernel pushes; 0 never does.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub kernel_after: u32,
    /// The window those blocks are counted in.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub kernel_window_seconds: u64,
    /// How long the kernel denies the client (capped by the proxy).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub kernel_ttl_seconds: u64,
    /// Clients whose blocks are counted at once; the oldest count is
    /// dropped beyond it.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_offenders: usize,
}

impl DenylistArgs {
    /// The rules the flags and files give.
    pub fn rules(&self) -> Result<Rules, RuleError> {
        let mut rules = Rules::default();
        for path in &self.block_paths {
            rules.add_path(path)?;
        }
        for ip in &self.block_ips {
            rules.add_ip(ip)?;
        }
        for file in &self.block_files {
            rules.load_file(file)?;
        }
        Ok(rules)
    }

    pub fn kernel_policy(&self) -> KernelPolicy {
        KernelPolicy {
            after: self.kernel_after,
            window: Duration::from_secs(self.kernel_window_seconds),
            ttl_seconds: self.kernel_ttl_seconds,
        }
    }
}

/// When to ask for a kernel deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Blocks within `window`; 0 disables pushes.
    pub after: u32,
    pub window: Duration,
    pub ttl_seconds: u64,
}

/// Why a request is blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hit {
    Ip(String),
    Path(String),
}

pub struct DenylistAgent {
    fixed: Rules,
    configured: RwLock<Rules>,
    policy: KernelPolicy,
    /// What the last `configure` offered; `None`: no pushes.
    limits: RwLock<Option<KernelPushLimits>>,
    offenders: Mutex<Offenders>,
}

impl DenylistAgent {
    pub fn new(rules: Rules, policy: KernelPolicy, max_offenders: usize) -> Self {
        Self {
            fixed: rules,
            configured: RwLock::new(Rules::default()),
            policy,
            limits: RwLock::new(None),
            offenders: Mutex::new(Offenders::new(policy.after, policy.window, max_offenders)),
        }
    }

    pub fn from_args(args: &DenylistArgs) -> Result<Self, RuleError> {
        Ok(Self::new(
            args.rules()?,
            args.kernel_policy(),
            args.max_offenders,
        ))
    }

    fn hit(&self, event: &RequestHeadersEvent) -> Option<Hit> {
        let configured = self
            .configured
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sets = [&self.fixed, &*configured];
        if let Some(ip) = event.client_ip()
            && let Some(net) = sets.iter().find_map(|r| r.match_ip(ip))
        {
            return Some(Hit::Ip(net.to_string()));
        }
        let path = event.path();
        sets.iter()
            .find_map(|r| r.match_path(path))
            .map(|prefix| Hit::Path(prefix.to_owned()))
    }

    /// Counts the block and, on an offence the proxy lets us act on, adds
    /// the kernel push.
    fn maybe_push(&self, verdict: Verdict, ip: Option<IpAddr>, now: Instant) -> Verdict {
        let Some(ip) = ip else { return verdict };
        let Some(limits) = self
            .limits
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
        else {
            return verdict;
        };
        let offence = self
            .offenders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .record(ip, now);
        let Some(blocks) = offence else {
            return verdict;
        };
        let ttl = self.policy.ttl_seconds.min(limits.max_ttl_seconds);
        if ttl == 0 {
            return verdict;
        }
        let len = if ip.is_ipv4() { 32 } else { 128 };
        info!(client = %ip, blocks, ttl_seconds = ttl, "asking for a kernel deny");
        verdict
            .kernel_deny()
            .kernel_prefix(format!("{ip}/{len}"))
            .kernel_ttl_seconds(ttl)
            .kernel_reason(format!(
                "denylist: {blocks} blocks within {}s",
                self.policy.window.as_secs()
            ))
    }

    fn decide(&self, event: &RequestHeadersEvent, now: Instant) -> Verdict {
        let Some(hit) = self.hit(event) else {
            return Verdict::allow();
        };
        let verdict = Verdict::block(403)
            .with_body(BLOCK_BODY)
            .with_header("content-type", "text/plain; charset=utf-8")
            .audit_tag("denylist");
        let verdict = match &hit {
            Hit::Ip(net) => verdict
                .audit_tag("ip")
                .rule_id(format!("denylist:ip:{net}"))
                .reason_code("IP_DENIED"),
            Hit::Path(prefix) => verdict
                .audit_tag("path")
                .rule_id(format!("denylist:path:{prefix}"))
                .reason_code("PATH_DENIED"),
        };
        self.maybe_push(verdict, event.client_ip(), now)
    }
}

#[async_trait]
impl Agent for DenylistAgent {
    fn name(&self) -> &str {
        "denylist"
    }

    fn extensions(&self) -> &[&str] {
        if self.policy.after == 0 {
            &[]
        } else {
            &[extensions::KERNEL_PUSH]
        }
    }

    async fn on_configure(&self, event: &ConfigureEvent) -> Result<(), ConfigureError> {
        // The SDK logs the refusal with its reason.
        let rules =
            Rules::from_config(&event.config).map_err(|e| ConfigureError::new(e.to_string()))?;
        info!(
            agent_id = %event.agent_id,
            paths = rules.paths.len(),
            networks = rules.nets.len(),
            kernel_push = event.kernel_push.is_some(),
            "configured"
        );
        *self
            .configured
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = rules;
        *self
            .limits
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = event.kernel_push.clone();
        Ok(())
    }

    async fn on_request_headers(&self, event: &RequestHeadersEvent) -> Verdict {
        self.decide(event, Instant::now())
    }
}

#[cfg(test)]
mod tests;
