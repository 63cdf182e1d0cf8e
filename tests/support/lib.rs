//! Test support.

pub mod harness;
pub mod packet;

/// Whether privileged tests (BPF, network namespaces) can run: they need
/// root. Tests that cannot run print `SKIPPED: ...` and return.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
