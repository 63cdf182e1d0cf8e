//! Leftovers of earlier runs that were killed before their guards ran
//! (SIGKILL, a crash, a power cut): namespaces, pin directories, nftables
//! tables, iptables rules and xdp-filter attachments named after a process
//! id that no longer exists. Removed at start, before anything is measured.

use std::{fs, path::Path, process::Command};

fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The process id in `name` after `prefix` (up to the next `-` or end).
fn pid_after(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?
        .split(['-', '_'])
        .next()?
        .parse()
        .ok()
}

fn quiet(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes what dead runs left; returns one line per thing removed.
pub fn clean() -> Vec<String> {
    let mut removed = Vec::new();
    let me = std::process::id();
    let dead = |pid: u32| pid != me && !alive(pid);

    if let Ok(dir) = fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if pid_after(&name, "sentinel-bench-").is_some_and(dead)
                && quiet("ip", &["netns", "del", &name]).is_some()
            {
                removed.push(format!("namespace {name}"));
            }
        }
    }
    if let Ok(dir) = fs::read_dir(crate::bpf::BPFFS) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // sentinel-bench-<tag>-<pid>-<n>
            let pid = name
                .strip_prefix("sentinel-bench-")
                .and_then(|rest| rest.rsplit('-').nth(1))
                .and_then(|p| p.parse().ok());
            if pid.is_some_and(dead) && fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(format!("pin directory {}", entry.path().display()));
            }
        }
    }
    if let Some(tables) = quiet("nft", &["list", "tables", "netdev"]) {
        for line in tables.lines() {
            let Some(name) = line.trim().strip_prefix("table netdev ") else {
                continue;
            };
            if pid_after(name, "sentinel_bench_").is_some_and(dead)
                && quiet("nft", &["delete", "table", "netdev", name]).is_some()
            {
                removed.push(format!("nftables table netdev {name}"));
            }
        }
    }
    if let Some(rules) = quiet("iptables", &["-w", "-t", "raw", "-S", "PREROUTING"]) {
        for rule in rules.lines().filter(|r| r.starts_with("-A PREROUTING")) {
            let stale = rule
                .split_whitespace()
                .find_map(|w| pid_after(w.trim_matches('"'), "sentinel-bench-"))
                .is_some_and(dead);
            if stale {
                let mut args = vec!["-w", "-t", "raw", "-D"];
                args.extend(rule.split_whitespace().skip(1).map(|w| w.trim_matches('"')));
                if quiet("iptables", &args).is_some() {
                    removed.push(format!("iptables rule `{rule}`"));
                }
            }
        }
    }
    // xdp-filter keeps one directory per interface it is loaded on; ours
    // are named sbh<pid>. When only dead ones remain, its state is ours.
    let programs = Path::new("/sys/fs/bpf/xdp-filter/programs");
    if let Ok(dir) = fs::read_dir(programs) {
        let (mut ours, mut live_elsewhere) = (false, false);
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let gone = !Path::new("/sys/class/net").join(&name).exists();
            if name.starts_with("sbh") && gone {
                let _ = fs::remove_dir_all(entry.path());
                removed.push(format!("xdp-filter state for {name}"));
                ours = true;
            } else {
                live_elsewhere = true;
            }
        }
        if ours && !live_elsewhere && fs::remove_dir_all("/sys/fs/bpf/xdp-filter").is_ok() {
            removed.push("xdp-filter pinned maps".to_owned());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::pid_after;

    #[test]
    fn pids() {
        assert_eq!(
            pid_after("sentinel-bench-1234", "sentinel-bench-"),
            Some(1234)
        );
        assert_eq!(pid_after("sentinel_bench_77", "sentinel_bench_"), Some(77));
        assert_eq!(pid_after("other-1", "sentinel-bench-"), None);
    }
}
