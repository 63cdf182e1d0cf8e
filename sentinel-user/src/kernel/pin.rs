//! The bpffs directory where shared maps are pinned, and the check that maps
//! found there have the layout this build expects.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};
use sentinel_common::{
    Meta, PortVerdict, RuleValue, maps,
    prefix::{LongKey4, PrefixKey6, PrefixRule4, direct, filter},
};
use tracing::info;

use super::KernelError;

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` writes into the zeroed struct we pass and reads the
    // NUL-terminated path.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(at: &Path) -> Result<(), KernelError> {
    fs::create_dir_all(at).map_err(|source| KernelError::PinDir {
        path: at.to_owned(),
        source,
    })?;
    let target = CString::new(at.as_os_str().as_bytes()).map_err(|_| KernelError::PinDir {
        path: at.to_owned(),
        source: std::io::Error::other("path contains a NUL byte"),
    })?;
    let fstype = c"bpf";
    let options = c"mode=0700";
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(KernelError::Mount {
            path: at.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    info!(path = %at.display(), "mounted bpffs");
    Ok(())
}

/// Makes sure `pin_path` is a directory on a bpffs, mounting one when none
/// is there: at `/sys/fs/bpf` when the pin path is below it (the kernel's
/// conventional place, empty until something mounts it), otherwise at the
/// pin path itself.
pub fn prepare(pin_path: &Path) -> Result<(), KernelError> {
    let conventional = Path::new("/sys/fs/bpf");
    let mount_point = if pin_path.starts_with(conventional) {
        conventional
    } else {
        pin_path
    };
    let probe = if pin_path.exists() {
        pin_path
    } else {
        mount_point
    };
    {
        // Two daemons starting together must not both see "no bpffs" and
        // both mount: the second mount would hide the first one's pins.
        let _lock = MountLock::take();
        if !(probe.exists() && is_bpffs(probe)) {
            mount_bpffs(mount_point)?;
        }
    }
    fs::create_dir_all(pin_path).map_err(|source| KernelError::PinDir {
        path: pin_path.to_owned(),
        source,
    })?;
    let _ = fs::set_permissions(pin_path, fs::Permissions::from_mode(0o700));
    if !is_bpffs(pin_path) {
        return Err(KernelError::NotBpffs {
            path: pin_path.to_owned(),
        });
    }
    Ok(())
}

/// An exclusive `flock` on a file in /run, held while checking for and
/// mounting bpffs. Best effort: without /run the check runs unlocked.
struct MountLock {
    // Held for its descriptor: closing it releases the lock.
    _file: Option<fs::File>,
}

impl MountLock {
    fn take() -> Self {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/sentinel-bpffs.lock")
            .ok();
        if let Some(file) = &file {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor we own; released on close.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        }
        Self { _file: file }
    }
}

/// What a pinned map must look like for this build.
struct Expected {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    /// Created with `BPF_F_MMAPABLE`: the daemon maps it into memory.
    mmapable: bool,
}

fn expected() -> [Expected; 18] {
    use std::mem::size_of;
    let hash = |name, key_size: usize, value_size: usize| Expected {
        name,
        map_type: MapType::Hash,
        key_size: key_size as u32,
        value_size: value_size as u32,
        mmapable: false,
    };
    let shared = |name, value_size: usize| Expected {
        name,
        map_type: MapType::Array,
        key_size: 4,
        value_size: value_size as u32,
        mmapable: true,
    };
    let rule = size_of::<RuleValue>();
    let slots = size_of::<[u32; 256]>();
    [
        shared(maps::ALLOW_V4_DIRECT, slots),
        shared(maps::ALLOW_V4_RULES, size_of::<PrefixRule4>()),
        hash(maps::ALLOW_V4_LONG, size_of::<LongKey4>(), 4),
        shared(maps::ALLOW_V6_FILTER, slots),
        hash(maps::ALLOW_V6_PREFIX, size_of::<PrefixKey6>(), rule),
        hash(maps::ALLOW_HOST_V4, 4, rule),
        hash(maps::ALLOW_HOST_V6, 16, rule),
        shared(maps::DENY_V4_DIRECT, slots),
        shared(maps::DENY_V4_RULES, size_of::<PrefixRule4>()),
        hash(maps::DENY_V4_LONG, size_of::<LongKey4>(), 4),
        shared(maps::DENY_V6_FILTER, slots),
        hash(maps::DENY_V6_PREFIX, size_of::<PrefixKey6>(), rule),
        hash(maps::DENY_HOST_V4, 4, rule),
        hash(maps::DENY_HOST_V6, 16, rule),
        Expected {
            name: maps::PORT_POLICY,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size_of::<PortVerdict>() as u32,
            mmapable: false,
        },
        Expected {
            name: maps::META,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size_of::<Meta>() as u32,
            mmapable: false,
        },
        // Watchlist tries: `bpf_lpm_trie_key` (u32 length, address).
        Expected {
            name: maps::WATCH_V4,
            map_type: MapType::LpmTrie,
            key_size: 8,
            value_size: rule as u32,
            mmapable: false,
        },
        Expected {
            name: maps::WATCH_V6,
            map_type: MapType::LpmTrie,
            key_size: 20,
            value_size: rule as u32,
            mmapable: false,
        },
    ]
}

/// Sizes of the prefix-index arrays that only some values fit: a direct
/// table indexes 16 or 24 bits, a filter 16 to 24, and a rules array holds
/// no more rules than its direct table can name.
fn check_index_sizes(
    pinned: &[(&'static str, u32)],
    incompatible: impl Fn(String) -> KernelError,
) -> Result<(), KernelError> {
    let size = |name: &str| pinned.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
    for (table, rules) in [
        (maps::ALLOW_V4_DIRECT, maps::ALLOW_V4_RULES),
        (maps::DENY_V4_DIRECT, maps::DENY_V4_RULES),
    ] {
        let Some(elements) = size(table) else {
            continue;
        };
        let Some(bits) = [direct::SMALL_BITS, direct::LARGE_BITS]
            .into_iter()
            .find(|b| direct::elements(*b) == elements)
        else {
            return Err(incompatible(format!(
                "{table} has {elements} elements; this build uses {} or {}",
                direct::elements(direct::SMALL_BITS),
                direct::elements(direct::LARGE_BITS)
            )));
        };
        if let Some(rules_len) = size(rules)
            && rules_len.saturating_sub(1) > direct::max_rules(bits)
        {
            return Err(incompatible(format!(
                "{rules} holds {} rules, more than {table} ({bits} bits) can index",
                rules_len - 1
            )));
        }
    }
    for name in [maps::ALLOW_V6_FILTER, maps::DENY_V6_FILTER] {
        if let Some(elements) = size(name)
            && !(filter::MIN_BITS..=filter::MAX_BITS).any(|b| filter::elements(b) == elements)
        {
            return Err(incompatible(format!(
                "{name} has {elements} elements, not a filter this build can read"
            )));
        }
    }
    Ok(())
}

/// Pinned map path for `name`.
pub fn map_path(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join(name)
}

/// Refuses pinned maps whose type, key or value size differ from this
/// build's, or whose recorded layout version is another. Maps that are not
/// pinned yet are fine: the loader creates them.
///
/// aya reuses a pinned map by name without comparing its definition, so
/// without this check a daemon from another version would read and write
/// foreign bytes.
pub fn check_layout(pin_path: &Path) -> Result<Vec<(&'static str, u32)>, KernelError> {
    let incompatible = |detail: String| KernelError::Incompatible {
        path: pin_path.to_owned(),
        detail,
    };
    let mut capacities = Vec::new();
    let mut any_pinned = false;
    for want in expected() {
        let path = map_path(pin_path, want.name);
        if !path.exists() {
            continue;
        }
        any_pinned = true;
        let map = MapData::from_pin(&path)
            .map_err(|e| incompatible(format!("cannot open {}: {e}", path.display())))?;
        let info = map
            .info()
            .map_err(|e| incompatible(format!("cannot inspect {}: {e}", path.display())))?;
        let map_type = info
            .map_type()
            .map_err(|e| incompatible(format!("{}: {e}", want.name)))?;
        if map_type != want.map_type
            || info.key_size() != want.key_size
            || info.value_size() != want.value_size
        {
            return Err(incompatible(format!(
                "{} is a {:?} map with {}-byte keys and {}-byte values; this build expects a {:?} map with {}-byte keys and {}-byte values",
                want.name,
                map_type,
                info.key_size(),
                info.value_size(),
                want.map_type,
                want.key_size,
                want.value_size
            )));
        }
        if want.mmapable && info.map_flags() & super::region::BPF_F_MMAPABLE == 0 {
            return Err(incompatible(format!(
                "{} was created without BPF_F_MMAPABLE, which this build needs to write it",
                want.name
            )));
        }
        if want.name == maps::META {
            let meta = aya::maps::Array::<_, Meta>::try_from(aya::maps::Map::Array(map))
                .and_then(|a| a.get(&0, 0))
                .map_err(|e| incompatible(format!("cannot read {}: {e}", want.name)))?;
            // 0: created by a daemon that stopped before stamping it; the
            // sizes above already match this build.
            if meta.layout_version != 0 && meta.layout_version != sentinel_common::LAYOUT_VERSION {
                return Err(incompatible(format!(
                    "they carry layout version {}, this build uses {}",
                    meta.layout_version,
                    sentinel_common::LAYOUT_VERSION
                )));
            }
        }
        capacities.push((want.name, info.max_entries()));
    }
    if any_pinned && !map_path(pin_path, maps::META).exists() {
        return Err(incompatible(format!(
            "{} is missing, so their layout version is unknown",
            maps::META
        )));
    }
    check_index_sizes(&capacities, incompatible)?;
    Ok(capacities)
}
