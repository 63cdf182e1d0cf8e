//! Test support shared by the test binaries of `sentinel-tests`:
//! [`netns`] (throwaway network namespaces joined by a veth pair),
//! [`daemon`] (the real `sentinel` binary with a generated configuration),
//! `harness` and `packet` (the fast path in-process, crafted frames),
//! [`http`] (test upstreams and clients for the proxy), [`tls`] (a
//! throwaway CA), [`agent`] (scriptable agents on every transport) and
//! [`client`] (HTTP clients from a chosen source address).

pub mod agent;
pub mod client;
pub mod daemon;
pub mod harness;
pub mod http;
pub mod netns;
pub mod packet;
pub mod tls;

use std::{fs::File, io::Write as _};

/// Whether privileged tests (BPF, network namespaces) can run: they need
/// root.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `true` when the calling test must be skipped for lack of root, after
/// saying so: `SKIPPED: <test>: <why>`. Written straight to the standard
/// error descriptor, which libtest does not capture, so the line shows
/// even though the test is reported as passed (libtest has no run-time
/// skip); `cargo xtask test` also says which tests skip and why.
pub fn skip_unless_root(why: &str) -> bool {
    if privileged() {
        return false;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
    true
}

/// An exclusive lock on `/tmp/<name>`, shared by every test and benchmark
/// process of this machine, held until the returned file is dropped.
pub fn try_machine_lock(name: &str) -> std::io::Result<File> {
    let path = std::env::temp_dir().join(name);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    file.lock()?;
    Ok(file)
}

/// [`try_machine_lock`], for tests: a failure to lock is a failed test.
pub fn machine_lock(name: &str) -> File {
    try_machine_lock(name).unwrap_or_else(|e| panic!("cannot lock /tmp/{name}: {e}"))
}
