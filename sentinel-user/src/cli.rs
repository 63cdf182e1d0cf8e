//! Command-line interface. `sentinel run` is the daemon; every other
//! subcommand is a client of its admin socket, except `validate`.
//!
//! Input is checked here first, so that a typo is refused with a one-line
//! reason before anything is sent; the daemon checks it again, because the
//! socket has other clients.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

mod import;

use crate::{
    admin::{Added, Entry, Request, Stats, client::Client},
    config::{self, Config},
    daemon::Status,
    net::{RuleList, check_reason, check_ttl, parse_ttl, validate_prefix},
};

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/sentinel/sentinel.kdl";

#[derive(Debug, Parser)]
#[command(
    name = "sentinel",
    version,
    about = "Host-level HTTP security layer: XDP denylist, admin API, metrics"
)]
pub struct Cli {
    /// Configuration file (the daemon's; clients read its admin socket path).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Admin socket to talk to, overriding the configuration.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "SENTINEL_ADMIN_SOCKET"
    )]
    pub admin_socket: Option<PathBuf>,
    /// Validate the configuration and exit (same as `sentinel validate`).
    #[arg(long)]
    pub validate: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run,
    /// Check a configuration file and report every problem.
    Validate,
    /// Manage the kernel denylist.
    #[command(subcommand)]
    Deny(ListCommand),
    /// Manage the kernel allowlist (checked before the denylist).
    #[command(subcommand)]
    Allow(ListCommand),
    /// Manage the watchlist: sources whose connections go to the
    /// quarantine listener.
    #[command(subcommand)]
    Watch(WatchCommand),
    /// Show the XDP counters per interface.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Show what the running daemon uses.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// Add a prefix (or replace its entry).
    Add(AddArgs),
    /// Remove a prefix.
    Remove {
        /// CIDR prefix, e.g. 192.0.2.0/24 or 2001:db8::/32.
        cidr: String,
    },
    /// List entries.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add many prefixes from a file, one per line (`-` for standard input;
    /// blank lines and `#` comments are skipped), with batched map updates.
    Import {
        file: PathBuf,
        #[command(flatten)]
        rule: RuleArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum WatchCommand {
    /// Add a prefix (or replace its entry).
    Add(AddArgs),
    /// Remove a prefix.
    Remove {
        /// CIDR prefix, e.g. 192.0.2.0/24 or 2001:db8::/32.
        cidr: String,
    },
    /// List entries, with their hits.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// CIDR prefix, e.g. 192.0.2.0/24 or 2001:db8::/32 (a bare address means
    /// the host).
    pub cidr: String,
    #[command(flatten)]
    pub rule: RuleArgs,
}

#[derive(Debug, Args)]
pub struct RuleArgs {
    /// How long the entry lives, e.g. 90s, 15m, 12h, 7d (default: the
    /// configured default TTL; none means forever).
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
    /// Why, shown in listings (at most 64 bytes).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

impl RuleArgs {
    fn ttl_ms(&self) -> anyhow::Result<Option<u64>> {
        let Some(text) = &self.ttl else {
            return Ok(None);
        };
        let ttl = parse_ttl(text)?;
        // The daemon knows the configured maximum; here, the hard ceiling.
        check_ttl(ttl, Duration::from_secs(config::MAX_TTL_CEILING_SECONDS))?;
        check_reason(self.reason.as_deref())?;
        Ok(Some(ttl.as_millis() as u64))
    }
}

/// Runs a client subcommand.
pub fn client_command(cli: &Cli, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Run | Command::Validate => {
            anyhow::bail!("`run` and `validate` are not admin socket commands")
        }
        Command::Deny(cmd) => list_command(cli, RuleList::Deny, cmd),
        Command::Allow(cmd) => list_command(cli, RuleList::Allow, cmd),
        Command::Watch(cmd) => watch_command(cli, cmd),
        Command::Stats { json } => {
            let stats: Stats = connect(cli)?.call(&Request::Stats {})?;
            print_stats(&stats, *json)
        }
        Command::Status { json } => {
            let status: Status = connect(cli)?.call(&Request::Status {})?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("sentinel {} (pid {})", status.version, status.pid);
                println!("config:      {}", status.config.display());
                println!("pin path:    {}", status.pin_path.display());
                match status.metrics_address {
                    Some(a) => println!("metrics:     http://{a}/metrics"),
                    None => println!("metrics:     disabled"),
                }
                for (iface, mode) in &status.interfaces {
                    println!("interface:   {iface} ({mode})");
                }
                for (name, address) in &status.listeners {
                    println!("listener:    {name} on {address}");
                }
            }
            Ok(())
        }
    }
}

/// The admin socket: `--admin-socket`, else the configuration's, else the
/// default.
fn admin_socket(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(path) = &cli.admin_socket {
        return Ok(path.clone());
    }
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    if cli.config.is_some() || config_path.exists() {
        let config = Config::load(&config_path)?;
        return Ok(config.admin.socket);
    }
    Ok(PathBuf::from(config::DEFAULT_ADMIN_SOCKET))
}

fn connect(cli: &Cli) -> anyhow::Result<Client> {
    Ok(Client::connect(&admin_socket(cli)?)?)
}

fn list_command(cli: &Cli, list: RuleList, cmd: &ListCommand) -> anyhow::Result<()> {
    match cmd {
        ListCommand::Add(args) => {
            let prefix = validate_prefix(&args.cidr, list)?;
            let ttl_ms = args.rule.ttl_ms()?;
            check_reason(args.rule.reason.as_deref())?;
            let added: Added = connect(cli)?.call(&Request::Add {
                list,
                prefix: prefix.to_string(),
                ttl_ms,
                reason: args.rule.reason.clone(),
            })?;
            let verb = if added.created { "added" } else { "replaced" };
            match added.ttl_seconds {
                Some(s) => println!("{verb} {} in the {list} for {}", added.prefix, human(s)),
                None => println!("{verb} {} in the {list} (no expiry)", added.prefix),
            }
            Ok(())
        }
        ListCommand::Remove { cidr } => {
            let prefix = validate_prefix(cidr, list)?;
            let _: serde_json::Value = connect(cli)?.call(&Request::Remove {
                list,
                prefix: prefix.to_string(),
            })?;
            println!("removed {prefix} from the {list}");
            Ok(())
        }
        ListCommand::List { json } => {
            let entries: Vec<Entry> = connect(cli)?.call(&Request::List { list })?;
            print_entries(&entries, *json)
        }
        ListCommand::Import { file, rule } => import(cli, list, file, rule),
    }
}

fn watch_command(cli: &Cli, cmd: &WatchCommand) -> anyhow::Result<()> {
    // Checked as the daemon checks them (see admin/watch.rs).
    let check = |cidr: &str| validate_prefix(cidr, RuleList::Allow);
    match cmd {
        WatchCommand::Add(args) => {
            let prefix = check(&args.cidr)?;
            let ttl_ms = args.rule.ttl_ms()?;
            check_reason(args.rule.reason.as_deref())?;
            let added: Added = connect(cli)?.call(&Request::WatchAdd {
                prefix: prefix.to_string(),
                ttl_ms,
                reason: args.rule.reason.clone(),
            })?;
            let verb = if added.created { "added" } else { "replaced" };
            match added.ttl_seconds {
                Some(s) => println!("{verb} {} in the watchlist for {}", added.prefix, human(s)),
                None => println!("{verb} {} in the watchlist (no expiry)", added.prefix),
            }
            Ok(())
        }
        WatchCommand::Remove { cidr } => {
            let prefix = check(cidr)?;
            let _: serde_json::Value = connect(cli)?.call(&Request::WatchRemove {
                prefix: prefix.to_string(),
            })?;
            println!("removed {prefix} from the watchlist");
            Ok(())
        }
        WatchCommand::List { json } => {
            let entries: Vec<Entry> = connect(cli)?.call(&Request::WatchList {})?;
            print_entries(&entries, *json)
        }
    }
}

fn import(cli: &Cli, list: RuleList, file: &Path, rule: &RuleArgs) -> anyhow::Result<()> {
    let ttl_ms = rule.ttl_ms()?;
    check_reason(rule.reason.as_deref())?;
    // Every line is checked before anything is sent, so a bad file
    // changes nothing.
    let prefixes = import::read_prefixes(file, list)?;
    if prefixes.is_empty() {
        bail!("{} holds no prefixes", file.display());
    }
    let mut client = connect(cli)?;
    let (created, replaced) =
        import::send(&mut client, list, &prefixes, ttl_ms, rule.reason.as_deref())?;
    println!(
        "imported {} prefixes into the {list}: {created} added, {replaced} replaced",
        prefixes.len()
    );
    Ok(())
}

fn human(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.round() as u64)).to_string()
}

fn print_entries(entries: &[Entry], json: bool) -> anyhow::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    if json {
        serde_json::to_writer_pretty(&mut out, entries)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<43} {:<14} {:<24} {:>14} {:>12}  LAST HIT",
        "PREFIX", "SOURCE", "REASON", "TTL", "HITS"
    )?;
    for e in entries {
        let ttl = e
            .ttl_remaining_seconds
            .map_or_else(|| "never".to_owned(), human);
        writeln!(
            out,
            "{:<43} {:<14} {:<24} {:>14} {:>12}  {}",
            e.prefix.to_string(),
            e.source,
            if e.reason.is_empty() { "-" } else { &e.reason },
            ttl,
            e.hits,
            e.last_hit.as_deref().unwrap_or("-")
        )?;
    }
    Ok(())
}

fn print_stats(stats: &Stats, json: bool) -> anyhow::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    if json {
        serde_json::to_writer_pretty(&mut out, stats)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "denylist entries: {}   allowlist entries: {}",
        stats.denylist_entries, stats.allowlist_entries
    )?;
    if stats.interfaces.is_empty() {
        writeln!(out, "no interface attached")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<16} {:<8} {:<10} {:<6} {:>16} {:>18}",
        "INTERFACE", "MODE", "REASON", "ACTION", "PACKETS", "BYTES"
    )?;
    for iface in &stats.interfaces {
        for r in &iface.reasons {
            writeln!(
                out,
                "{:<16} {:<8} {:<10} {:<6} {:>16} {:>18}",
                iface.interface, iface.mode, r.reason, r.action, r.packets, r.bytes
            )?;
        }
    }
    Ok(())
}

/// `sentinel validate` / `sentinel --validate`: exit 0 when valid, 1 when
/// not, with every problem printed.
pub fn validate(path: &Path) -> i32 {
    match Config::load(path) {
        Ok(_) => {
            println!("{}: configuration is valid", path.display());
            0
        }
        Err(e) => {
            print_config_error(&e);
            1
        }
    }
}

/// Prints a configuration error, one `error:` line per problem.
pub fn print_config_error(error: &config::ConfigError) {
    for line in error.to_string().lines() {
        eprintln!("error: {line}");
    }
}
