//! The filters a flood is measured against, each dropping one source
//! address on the root-side veth end, each counting its own drops, each
//! removed on drop of its guard.

use std::{fs, net::Ipv4Addr, process::Command};

use anyhow::{Context as _, Result, bail};
use sentinel::config::XdpMode;

use crate::{netns::NetNs, testrun::Ours, xdp_filter::StockXdpFilter};

/// What drops the flood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropper {
    /// Sentinel's XDP program, native mode.
    Sentinel,
    /// xdp-filter, native mode.
    XdpFilter,
    /// An nftables netdev ingress chain.
    Nftables,
    /// An iptables rule in the raw table's PREROUTING chain.
    Iptables,
    /// Nothing: the datagrams reach the UDP layer (reference only).
    Nothing,
}

impl Dropper {
    pub const ALL: [Dropper; 5] = [
        Dropper::Sentinel,
        Dropper::XdpFilter,
        Dropper::Nftables,
        Dropper::Iptables,
        Dropper::Nothing,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Dropper::Sentinel => "sentinel (XDP native)",
            Dropper::XdpFilter => "xdp-filter (XDP native)",
            Dropper::Nftables => "nftables netdev ingress",
            Dropper::Iptables => "iptables raw PREROUTING",
            Dropper::Nothing => "no filter (reference)",
        }
    }
}

/// An attached filter.
pub trait Armed {
    /// Packets it has dropped so far; `None` when it drops nothing.
    fn dropped(&mut self) -> Result<Option<u64>>;
}

/// Runs `program` with `args`; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Attaches `filter` to `ns.host_if`, dropping packets from `source`.
/// `ours` is a loaded Sentinel fast path whose denylist holds `source`.
pub fn arm<'a>(
    filter: Dropper,
    ns: &NetNs,
    source: Ipv4Addr,
    ours: &'a mut Ours,
) -> Result<Box<dyn Armed + 'a>> {
    let iface = ns.host_if.clone();
    Ok(match filter {
        Dropper::Sentinel => {
            let mode = ours
                .kernel
                .attach(&iface, XdpMode::Native)
                .context("cannot attach Sentinel's program")?;
            let armed = OursArmed { ours, iface };
            if mode != "native" {
                bail!("Sentinel's program attached in {mode} mode, not native");
            }
            Box::new(armed)
        }
        Dropper::XdpFilter => {
            let stock = StockXdpFilter::load(&iface, "native")?;
            stock.deny(source.into())?;
            Box::new(XdpFilterArmed(stock))
        }
        Dropper::Nftables => Box::new(NftArmed::new(&iface, source)?),
        Dropper::Iptables => Box::new(IptablesArmed::new(&iface, source)?),
        Dropper::Nothing => Box::new(Nothing),
    })
}

struct OursArmed<'a> {
    ours: &'a mut Ours,
    iface: String,
}

impl Armed for OursArmed<'_> {
    fn dropped(&mut self) -> Result<Option<u64>> {
        let stats = self.ours.kernel.stats();
        stats
            .iter()
            .find(|s| s.interface == self.iface)
            .and_then(|s| s.reasons.iter().find(|r| r.reason == "denylist"))
            .map(|r| Some(r.packets))
            .with_context(|| format!("no denylist counter for {}", self.iface))
    }
}

impl Drop for OursArmed<'_> {
    fn drop(&mut self) {
        self.ours.kernel.detach(&self.iface);
    }
}

struct XdpFilterArmed(StockXdpFilter);

impl Armed for XdpFilterArmed {
    fn dropped(&mut self) -> Result<Option<u64>> {
        self.0.drops().map(Some)
    }
}

struct NftArmed {
    table: String,
}

impl NftArmed {
    fn new(iface: &str, source: Ipv4Addr) -> Result<Self> {
        let table = format!("sentinel_bench_{}", std::process::id());
        let ruleset = format!(
            "table netdev {table} {{\n\
             \tchain ingress {{\n\
             \t\ttype filter hook ingress device \"{iface}\" priority -500; policy accept;\n\
             \t\tip saddr {source} counter drop\n\
             \t}}\n\
             }}\n"
        );
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let path = dir.path().join("ruleset.nft");
        fs::write(&path, ruleset).with_context(|| format!("cannot write {}", path.display()))?;
        let path = path.to_string_lossy().into_owned();
        run("nft", &["-f", &path])?;
        Ok(Self { table })
    }
}

impl Armed for NftArmed {
    fn dropped(&mut self) -> Result<Option<u64>> {
        let text = run("nft", &["-j", "list", "table", "netdev", &self.table])?;
        let json: serde_json::Value =
            serde_json::from_str(&text).context("`nft -j` printed invalid JSON")?;
        json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["rule"]["expr"].as_array())
            .flatten()
            .find_map(|expr| expr["counter"]["packets"].as_u64())
            .map(Some)
            .with_context(|| format!("no counter in table netdev {}", self.table))
    }
}

impl Drop for NftArmed {
    fn drop(&mut self) {
        if let Err(e) = run("nft", &["delete", "table", "netdev", &self.table]) {
            eprintln!("warning: {e}");
        }
    }
}

struct IptablesArmed {
    rule: Vec<String>,
    tag: String,
    /// With iptables-nft, inserting the first raw rule creates nftables'
    /// `table ip raw`; remove it again if it was not there before.
    created_table: bool,
}

impl IptablesArmed {
    fn new(iface: &str, source: Ipv4Addr) -> Result<Self> {
        let tag = format!("sentinel-bench-{}", std::process::id());
        let rule: Vec<String> = [
            "-i",
            iface,
            "-s",
            &format!("{source}/32"),
            "-m",
            "comment",
            "--comment",
            &tag,
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let existed = Command::new("nft")
            .args(["list", "table", "ip", "raw"])
            .output()
            .is_ok_and(|o| o.status.success());
        let mut args = vec!["-w", "-t", "raw", "-I", "PREROUTING"];
        args.extend(rule.iter().map(String::as_str));
        run("iptables", &args)?;
        Ok(Self {
            rule,
            tag,
            created_table: !existed,
        })
    }
}

impl Armed for IptablesArmed {
    fn dropped(&mut self) -> Result<Option<u64>> {
        let text = run(
            "iptables",
            &["-w", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"],
        )?;
        let marker = format!("/* {} */", self.tag);
        text.lines()
            .find(|line| line.contains(&marker))
            .and_then(|line| line.split_whitespace().next())
            .and_then(|pkts| pkts.parse().ok())
            .map(Some)
            .with_context(|| format!("no rule tagged {} in the raw table", self.tag))
    }
}

impl Drop for IptablesArmed {
    fn drop(&mut self) {
        let mut args = vec!["-w", "-t", "raw", "-D", "PREROUTING"];
        args.extend(self.rule.iter().map(String::as_str));
        if let Err(e) = run("iptables", &args) {
            eprintln!("warning: {e}");
        }
        if self.created_table {
            let empty = run("iptables", &["-w", "-t", "raw", "-S"])
                .is_ok_and(|rules| rules.lines().all(|l| l.starts_with("-P ")));
            if empty && let Err(e) = run("nft", &["delete", "table", "ip", "raw"]) {
                eprintln!("warning: {e}");
            }
        }
    }
}

struct Nothing;

impl Armed for Nothing {
    fn dropped(&mut self) -> Result<Option<u64>> {
        Ok(None)
    }
}
