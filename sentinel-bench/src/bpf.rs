//! The few raw `bpf(2)` commands the benchmarks need beside aya: opening a
//! map pinned by another tool, and filling a map with many elements at once.
//!
//! Layouts follow `union bpf_attr` in include/uapi/linux/bpf.h.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use sentinel::kernel::sys::{self, BatchAttr};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Elements per batch syscall.
const BATCH: usize = 8192;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: every caller in this file passes the `bpf_attr` prefix its
    // command expects, with pointers to memory that outlives the call.
    unsafe { sys::bpf(cmd, attr) }
}

/// `BPF_MAP_TYPE_LPM_TRIE`.
pub const MAP_TYPE_LPM_TRIE: u32 = 11;
/// `BPF_F_NO_PREALLOC` (required by LPM tries).
pub const F_NO_PREALLOC: u32 = 1;

/// `BPF_MAP_CREATE`: a new, unpinned map, freed when the descriptor closes.
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut attr = CreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: *b"sentinel_bench\0\0",
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET`: a file descriptor for the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path contains a NUL byte"))?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_PROG_TEST_RUN` of the program behind `fd` on `data`, `repeat`
/// times: (return value, mean nanoseconds per run as the kernel measured).
pub fn prog_test_run(fd: BorrowedFd<'_>, data: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    #[repr(C)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let mut attr = TestAttr {
        prog_fd: fd.as_raw_fd() as u32,
        retval: 0,
        data_size_in: data.len() as u32,
        data_size_out: 0,
        data_in: data.as_ptr() as u64,
        data_out: 0,
        repeat,
        duration: 0,
        ctx_size_in: 0,
        ctx_size_out: 0,
        ctx_in: 0,
        ctx_out: 0,
        flags: 0,
        cpu: 0,
        batch_size: 0,
        _pad: 0,
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.retval, attr.duration))
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_MAP_LOOKUP_ELEM` into `value` (sized by the caller: for per-CPU
/// maps, one 8-byte-aligned slot per possible CPU).
pub fn lookup_elem(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(|_| ())
}

fn update_elem(fd: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Writes `keys` (each `key_size` bytes) with `values` (each `value_size`
/// bytes: for per-CPU maps, one 8-byte-aligned slot per possible CPU) into
/// the map behind `fd`, with `BPF_MAP_UPDATE_BATCH` where the kernel has it
/// and one update per element where it does not.
pub fn update_many(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    keys: &[u8],
    values: &[u8],
) -> io::Result<()> {
    let count = keys.len() / key_size;
    if keys.len() != count * key_size || values.len() != count * value_size {
        return Err(io::Error::other("keys and values do not pair up"));
    }
    let mut batch_ok = true;
    for start in (0..count).step_by(BATCH) {
        let n = BATCH.min(count - start);
        let k = &keys[start * key_size..(start + n) * key_size];
        let v = &values[start * value_size..(start + n) * value_size];
        if batch_ok {
            let mut attr = BatchAttr {
                keys: k.as_ptr() as u64,
                values: v.as_ptr() as u64,
                count: n as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            match bpf(sys::BPF_MAP_UPDATE_BATCH, &mut attr) {
                Ok(_) => continue,
                Err(e) if sys::batch_unsupported(&e) => batch_ok = false,
                Err(e) => return Err(e),
            }
        }
        for i in 0..n {
            update_elem(
                fd,
                &k[i * key_size..(i + 1) * key_size],
                &v[i * value_size..(i + 1) * value_size],
            )?;
        }
    }
    Ok(())
}

/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where bpffs is conventionally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at [`BPFFS`] unless one is there already.
pub fn ensure_bpffs() -> io::Result<()> {
    let path = Path::new(BPFFS);
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path contains a NUL byte"))?;
    // SAFETY: `statfs` reads the NUL-terminated path and writes into the
    // zeroed struct we pass.
    let mounted = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == BPF_FS_MAGIC
    };
    if mounted {
        return Ok(());
    }
    fs::create_dir_all(path)?;
    // SAFETY: every pointer is a valid NUL-terminated string for the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A directory of this process under [`BPFFS`], removed (with everything
/// pinned in it) on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    /// `/sys/fs/bpf/sentinel-bench-<tag>-<pid>-<n>`; not created: whoever
    /// pins into it does that.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        Self {
            path: Path::new(BPFFS).join(format!(
                "sentinel-bench-{tag}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            )),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Number of possible CPUs: the number of slots of a per-CPU map value.
pub fn possible_cpus() -> io::Result<usize> {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(&text)
        .ok_or_else(|| io::Error::other(format!("cannot parse CPU list '{}'", text.trim())))
}

/// "0-3,5" -> 5 (highest CPU + 1, as the kernel sizes per-CPU values).
fn parse_cpu_list(text: &str) -> Option<usize> {
    let mut highest = None;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let last = part.rsplit('-').next()?.trim().parse::<usize>().ok()?;
        highest = Some(highest.map_or(last, |h: usize| h.max(last)));
    }
    highest.map(|h| h + 1)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,5"), Some(6));
        assert_eq!(parse_cpu_list(""), None);
    }
}
