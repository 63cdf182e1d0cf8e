//! Facts about the host and the daemon's own process, for profile records.
//!
//! Contract:
//! - [`HostSampler::start`] takes a first sample at once, then one every
//!   interval on tokio's blocking pool, never on a request's path; the
//!   returned [`HostInfo`] gives the latest [`HostSnapshot`] for the cost
//!   of an atomic load. The sampling task ends when the last `HostInfo`
//!   is dropped.
//! - A fact that cannot be read is an empty string (or 0), never an error:
//!   the profile goes on without it.
//! - The snapshot serializes with the seed's names: `ip_address` (the
//!   address of the default route's interface, else of the first other
//!   interface, IPv4 first; loopback and link-local never), `pid`,
//!   `run_as` (the effective user's name), `executable_path`,
//!   `executable_name`, `executable_version` (this crate's version),
//!   `process_name` (the kernel's name for the process), `process_path`
//!   (its working directory), `process_command` (argv joined by spaces),
//!   `platform` (`linux`, ...), `cpu_usage` (percent of one CPU since the
//!   previous sample, so above 100 when several are busy), `memory_usage`
//!   (resident bytes), `architecture` (`x86_64`, ...), `os_name`,
//!   `os_version` and `os_build` (the kernel release).

use std::{
    net::IpAddr,
    sync::{Arc, Weak},
    time::Duration,
};

use arc_swap::ArcSwap;
use serde::Serialize;
use sysinfo::{Networks, Pid, ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind, Users};
use tracing::warn;

/// Shortest interval between samples: CPU usage means little below it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostSnapshot {
    pub ip_address: String,
    pub pid: u32,
    pub run_as: String,
    pub executable_path: String,
    pub executable_name: String,
    pub executable_version: String,
    pub process_name: String,
    pub process_path: String,
    pub process_command: String,
    pub platform: String,
    pub cpu_usage: f32,
    pub memory_usage: u64,
    pub architecture: String,
    pub os_name: String,
    pub os_version: String,
    pub os_build: String,
}

/// The latest snapshot; cheap to clone and to read.
#[derive(Clone)]
pub struct HostInfo {
    latest: Arc<ArcSwap<HostSnapshot>>,
}

impl HostInfo {
    pub fn snapshot(&self) -> Arc<HostSnapshot> {
        self.latest.load_full()
    }
}

/// Reads the facts; [`HostSampler::start`] runs one in the background.
pub struct HostSampler {
    system: Option<System>,
    networks: Option<Networks>,
    users: Option<Users>,
    pid: u32,
    /// The user name of the last effective uid seen, and that uid.
    run_as: Option<(String, String)>,
    fixed: Fixed,
}

/// What does not change while the process runs.
struct Fixed {
    executable_path: String,
    executable_name: String,
    process_command: String,
    architecture: String,
    os_name: String,
    os_version: String,
    os_build: String,
}

fn or_empty<E: std::fmt::Display>(what: &str, value: Result<String, E>) -> String {
    value.unwrap_or_else(|error| {
        warn!(%error, "cannot read the host's {what}");
        String::new()
    })
}

impl Default for HostSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl HostSampler {
    pub fn new() -> Self {
        let exe = std::env::current_exe().ok();
        let executable_path = exe
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let executable_name = exe
            .as_deref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let process_command = std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let architecture = match System::cpu_arch() {
            arch if arch.is_empty() => std::env::consts::ARCH.to_owned(),
            arch => arch,
        };
        let fixed = Fixed {
            executable_path,
            executable_name,
            process_command,
            architecture,
            os_name: or_empty("OS name", System::name()),
            os_version: or_empty("OS version", System::os_version()),
            os_build: or_empty("kernel version", System::kernel_version()),
        };
        let system = System::new()
            .map_err(|error| warn!(%error, "no process statistics for the profile"))
            .ok();
        let networks = Networks::new()
            .map_err(|error| warn!(%error, "no network interfaces for the profile"))
            .ok();
        Self {
            system,
            networks,
            users: None,
            pid: std::process::id(),
            run_as: None,
            fixed,
        }
    }

    /// Reads the facts now. CPU usage is over the time since the previous
    /// call (0 on the first).
    pub fn sample(&mut self) -> HostSnapshot {
        let pid = Pid::from_u32(self.pid);
        let mut cpu_usage = 0.0;
        let mut memory_usage = 0;
        let mut process_name = String::new();
        let mut euid = None;
        if let Some(system) = &mut self.system {
            system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                false,
                ProcessRefreshKind::nothing()
                    .with_cpu()
                    .with_memory()
                    .with_user(UpdateKind::Always)
                    .without_tasks(),
            );
            if let Some(process) = system.process(pid) {
                cpu_usage = process.cpu_usage();
                memory_usage = process.memory();
                process_name = process.name().to_string_lossy().into_owned();
                euid = process
                    .effective_user_id()
                    .or_else(|| process.user_id())
                    .cloned();
            }
        }
        if process_name.is_empty() {
            process_name = self.fixed.executable_name.clone();
        }
        let run_as = match euid {
            Some(uid) => self.user_name(&uid),
            None => String::new(),
        };
        let process_path = std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let ip_address = self
            .networks
            .as_mut()
            .and_then(|networks| {
                networks.refresh(true);
                primary_address(networks, default_route_interface().as_deref())
            })
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        HostSnapshot {
            ip_address,
            pid: self.pid,
            run_as,
            executable_path: self.fixed.executable_path.clone(),
            executable_name: self.fixed.executable_name.clone(),
            executable_version: env!("CARGO_PKG_VERSION").to_owned(),
            process_name,
            process_path,
            process_command: self.fixed.process_command.clone(),
            platform: std::env::consts::OS.to_owned(),
            cpu_usage,
            memory_usage,
            architecture: self.fixed.architecture.clone(),
            os_name: self.fixed.os_name.clone(),
            os_version: self.fixed.os_version.clone(),
            os_build: self.fixed.os_build.clone(),
        }
    }

    /// The name of `uid`; the user list is read again only when the uid
    /// changes (a daemon that drops privileges).
    fn user_name(&mut self, uid: &sysinfo::Uid) -> String {
        let key = uid.to_string();
        if let Some((seen, name)) = &self.run_as
            && *seen == key
        {
            return name.clone();
        }
        let users = match &mut self.users {
            Some(users) => {
                users.refresh();
                users
            }
            None => match Users::new_with_refreshed_list() {
                Ok(users) => self.users.insert(users),
                Err(error) => {
                    warn!(%error, "cannot read the user list");
                    return key;
                }
            },
        };
        // A uid without a name (containers often have none) is shown as
        // the number.
        let name = users
            .get_user_by_id(uid)
            .map_or_else(|| key.clone(), |u| u.name().to_owned());
        self.run_as = Some((key, name.clone()));
        name
    }

    /// Samples once now, then every `interval` (at least
    /// [`MIN_INTERVAL`]) in a task of the current tokio runtime (outside
    /// one, the first sample stays, with a warning).
    pub fn start(interval: Duration) -> HostInfo {
        let mut sampler = HostSampler::new();
        let latest = Arc::new(ArcSwap::from_pointee(sampler.sample()));
        let weak: Weak<ArcSwap<HostSnapshot>> = Arc::downgrade(&latest);
        let interval = interval.max(MIN_INTERVAL);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!("host facts sampled once: no tokio runtime to refresh them in");
            return HostInfo { latest };
        };
        runtime.spawn(async move {
            let mut sampler = Some(sampler);
            loop {
                tokio::time::sleep(interval).await;
                if weak.strong_count() == 0 {
                    return;
                }
                let Some(mut s) = sampler.take() else {
                    return;
                };
                let sampled = tokio::task::spawn_blocking(move || {
                    let snapshot = s.sample();
                    (s, snapshot)
                })
                .await;
                let Ok((s, snapshot)) = sampled else {
                    warn!("host sampling failed; host facts stay as last read");
                    return;
                };
                sampler = Some(s);
                match weak.upgrade() {
                    Some(latest) => latest.store(Arc::new(snapshot)),
                    None => return,
                }
            }
        });
        HostInfo { latest }
    }
}

/// The interface of the IPv4 default route, from /proc/net/route.
fn default_route_interface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_route(&table)
}

fn parse_default_route(table: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let iface = fields.next()?;
        let destination = fields.next()?;
        let _gateway = fields.next()?;
        let flags = u32::from_str_radix(fields.next()?, 16).ok()?;
        (destination == "00000000" && flags & RTF_UP != 0).then(|| iface.to_owned())
    })
}

/// The host's primary address: on `preferred` if it has one, else on the
/// first interface by name; IPv4 before IPv6.
fn primary_address(networks: &Networks, preferred: Option<&str>) -> Option<IpAddr> {
    let mut interfaces: Vec<(String, Vec<IpAddr>)> = networks
        .iter()
        .map(|(name, data)| {
            let addrs = data.ip_networks().iter().map(|n| n.addr).collect();
            (name.to_string_lossy().into_owned(), addrs)
        })
        .collect();
    interfaces.sort_by(|a, b| a.0.cmp(&b.0));
    choose_address(&interfaces, preferred)
}

fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

fn choose_address(interfaces: &[(String, Vec<IpAddr>)], preferred: Option<&str>) -> Option<IpAddr> {
    let ordered = interfaces
        .iter()
        .filter(|(name, _)| Some(name.as_str()) == preferred)
        .chain(
            interfaces
                .iter()
                .filter(|(name, _)| Some(name.as_str()) != preferred),
        );
    let candidates: Vec<IpAddr> = ordered
        .flat_map(|(_, addrs)| addrs.iter().copied())
        .filter(usable)
        .collect();
    candidates
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| candidates.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The user name of the effective uid, from /etc/passwd.
    fn passwd_name(uid: u32) -> Option<String> {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.get(2)? == &uid.to_string()).then(|| fields[0].to_owned())
        })
    }

    fn busy(time: Duration) {
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < time {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }

    #[test]
    fn a_sample_reports_this_process_and_this_host() {
        let mut sampler = HostSampler::new();
        // sysinfo computes no usage until the process has CPU time on
        // record: give it some before the first sample.
        busy(Duration::from_millis(100));
        let first = sampler.sample();
        assert_eq!(first.pid, std::process::id());
        let exe = std::env::current_exe().expect("current exe");
        assert_eq!(first.executable_path, exe.display().to_string());
        assert_eq!(
            first.executable_name,
            exe.file_name().expect("name").to_string_lossy()
        );
        assert_eq!(first.executable_version, env!("CARGO_PKG_VERSION"));
        assert!(first.process_command.starts_with(&first.executable_path));
        assert_eq!(
            first.process_path,
            std::env::current_dir().expect("cwd").display().to_string()
        );
        assert_eq!(first.platform, std::env::consts::OS);
        assert_eq!(first.architecture, std::env::consts::ARCH);
        assert!(first.memory_usage > 1024 * 1024, "{}", first.memory_usage);
        // The kernel's name for a process is its file name, cut to 15 bytes.
        let comm = std::fs::read_to_string("/proc/self/comm").expect("comm");
        assert_eq!(first.process_name, comm.trim_end());
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("release");
        assert_eq!(first.os_build, release.trim());
        assert!(!first.os_name.is_empty());
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        let want = passwd_name(euid).unwrap_or_else(|| euid.to_string());
        assert_eq!(first.run_as, want);
        // A host with a default route has a primary address.
        if default_route_interface().is_some() {
            assert!(!first.ip_address.is_empty());
        }
        if !first.ip_address.is_empty() {
            let ip: IpAddr = first.ip_address.parse().expect("an address");
            assert!(usable(&ip), "{ip}");
        }

        // Busy for a while: the next sample sees CPU time spent.
        busy(Duration::from_millis(400));
        let second = sampler.sample();
        assert!(second.cpu_usage > 5.0, "cpu {}", second.cpu_usage);
    }

    #[test]
    fn the_snapshot_serializes_with_exactly_the_seed_names() {
        let snapshot = HostSampler::new().sample();
        let value = serde_json::to_value(&snapshot).expect("json");
        let mut keys: Vec<&str> = value
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut want = vec![
            "ip_address",
            "pid",
            "run_as",
            "executable_path",
            "executable_name",
            "executable_version",
            "process_name",
            "process_path",
            "process_command",
            "platform",
            "cpu_usage",
            "memory_usage",
            "architecture",
            "os_name",
            "os_version",
            "os_build",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert!(value["pid"].is_u64() && value["memory_usage"].is_u64());
        assert!(value["cpu_usage"].is_f64());
    }

    #[tokio::test]
    async fn the_background_sampler_refreshes_and_stops_with_its_handles() {
        let info = HostSampler::start(Duration::ZERO);
        let first = info.snapshot();
        assert_eq!(first.pid, std::process::id());
        // Samples come at MIN_INTERVAL: a later one is a new snapshot.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = info.snapshot();
            if !Arc::ptr_eq(&now, &first) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never refreshed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let weak = Arc::downgrade(&info.latest);
        drop(info);
        // The task may hold the snapshot for the instant of a store; then
        // it lets go and ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while weak.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the sampler kept its snapshot"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn outside_a_runtime_the_first_sample_stays() {
        let info = HostSampler::start(Duration::from_secs(1));
        assert_eq!(info.snapshot().pid, std::process::id());
    }

    #[test]
    fn the_default_route_interface_comes_first() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\n\
                     eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\n";
        assert_eq!(parse_default_route(table).as_deref(), Some("eth0"));
        assert_eq!(parse_default_route("Iface\tDestination\n"), None);
        assert_eq!(parse_default_route("garbage"), None);
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        let interfaces = vec![
            ("docker0".to_owned(), vec![ip("172.17.0.1")]),
            (
                "eth0".to_owned(),
                vec![ip("fe80::1"), ip("2001:db8::5"), ip("192.168.1.20")],
            ),
            ("lo".to_owned(), vec![ip("127.0.0.1"), ip("::1")]),
        ];
        assert_eq!(
            choose_address(&interfaces, Some("eth0")),
            Some(ip("192.168.1.20"))
        );
        assert_eq!(choose_address(&interfaces, None), Some(ip("172.17.0.1")));
        let v6_only = vec![
            ("eth0".to_owned(), vec![ip("fe80::1"), ip("2001:db8::5")]),
            ("lo".to_owned(), vec![ip("127.0.0.1")]),
        ];
        assert_eq!(choose_address(&v6_only, None), Some(ip("2001:db8::5")));
        let lo_only = vec![("lo".to_owned(), vec![ip("127.0.0.1"), ip("::1")])];
        assert_eq!(choose_address(&lo_only, None), None);
    }
}
