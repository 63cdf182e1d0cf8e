//! The raw `bpf(2)` commands aya does not wrap: batched map updates and
//! lookups, and `BPF_PROG_TEST_RUN` for program types aya 0.14 gives no
//! test run (sk_lookup). Layouts follow `union bpf_attr` in include/uapi/linux/bpf.h.
//! Public so that the benchmarks drive peer programs' maps the same way.

use std::io;

pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr`, for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct TestRunAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    pub _pad: u32,
}

/// The `batch` member of `union bpf_attr`, for the `BPF_MAP_*_BATCH`
/// commands.
#[repr(C)]
#[derive(Debug, Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// Runs `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
///
/// `attr` must be the `bpf_attr` prefix `cmd` expects, and every pointer
/// inside it must point at memory of the sizes `cmd` reads or writes, valid
/// for the duration of the call.
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: upheld by the caller, see above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Whether the kernel lacks batch operations for a map type: `EINVAL`,
/// `EOPNOTSUPP`, or `ENOTSUPP` (524, the kernel-internal code the bpf
/// syscall returns when a map type has no batch ops).
pub fn batch_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524)
    )
}
