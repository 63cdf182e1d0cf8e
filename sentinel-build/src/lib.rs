//! Building the eBPF object, shared by `xtask` and `sentinel-user`'s build
//! script so that both compile the kernel program exactly the same way.
//!
//! The eBPF crate needs three things a stock Rust install lacks: a toolchain
//! that accepts `-Z build-std` (nightly, or stable with `RUSTC_BOOTSTRAP=1`),
//! the `rust-src` component for that toolchain, and `bpf-linker` built
//! against that toolchain's own LLVM (Debian's LLVM is too old, and no
//! prebuilt binary can be downloaded). [`provision`] installs the last two
//! idempotently; [`build`] only compiles and fails with an actionable message
//! when something is missing.

use std::{
    env,
    ffi::OsString,
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The target triple of the eBPF object (little-endian hosts only: x86_64 and
/// aarch64 are what Sentinel runs on).
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// An error with a message meant for the person at the terminal.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

type Result<T, E = Error> = std::result::Result<T, E>;

fn err(msg: impl Into<String>) -> Error {
    Error(msg.into())
}

/// The toolchain that compiles the eBPF crate.
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// rustup toolchain name (`nightly` or `stable`).
    pub name: String,
    /// Stable needs `RUSTC_BOOTSTRAP=1` for `-Z build-std`.
    pub bootstrap: bool,
    /// `$(rustc --print sysroot)`.
    pub sysroot: PathBuf,
    /// LLVM major version of this rustc (bpf-linker must match it).
    pub llvm_major: u32,
}

/// Runs `cmd`, returning trimmed stdout, or an error naming the command.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| err(format!("cannot run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A `Command` for `program` run by rustup under `toolchain`, with the
/// variables an enclosing cargo sets removed so they cannot leak into the
/// nested build (they name the host toolchain and host flags).
pub fn rustup_run(toolchain: &str, program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, program]);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = key == "RUSTC"
            || key == "RUSTDOC"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC_WORKSPACE_WRAPPER"
            || key == "RUSTFLAGS"
            || key == "RUSTUP_TOOLCHAIN"
            || key == "CARGO_TARGET_DIR"
            || key == "CARGO_BUILD_TARGET"
            || key == "CARGO_ENCODED_RUSTFLAGS"
            || key == "CARGO_MAKEFLAGS"
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_");
        if leaks {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Picks nightly when rustup has it, stable with `RUSTC_BOOTSTRAP=1`
/// otherwise, and reads its sysroot and LLVM version.
pub fn toolchain() -> Result<Toolchain> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))
        .map_err(|e| err(format!("rustup is required to build the eBPF program: {e}")))?;
    let has_nightly = list.lines().any(|l| l.starts_with("nightly"));
    let (name, bootstrap) = if has_nightly {
        ("nightly", false)
    } else {
        ("stable", true)
    };
    let verbose = output(rustup_run(name, "rustc").arg("-vV"))?;
    let llvm = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .ok_or_else(|| err(format!("`rustc +{name} -vV` printed no LLVM version")))?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| err(format!("cannot parse LLVM version {llvm:?}")))?;
    let sysroot = PathBuf::from(output(
        rustup_run(name, "rustc").args(["--print", "sysroot"]),
    )?);
    Ok(Toolchain {
        name: name.to_owned(),
        bootstrap,
        sysroot,
        llvm_major,
    })
}

/// Where bpf-linker for an LLVM major version is cached. Outside the target
/// directory on purpose: it takes minutes to build and survives `cargo clean`
/// and fresh checkouts on the same machine.
pub fn linker_root(llvm_major: u32) -> PathBuf {
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache
        .join("sentinel")
        .join("bpf-linker")
        .join(format!("llvm-{llvm_major}"))
}

/// The cached bpf-linker, if it exists and runs (a toolchain update leaves
/// its libLLVM link dangling, and then it must be rebuilt).
pub fn linker(tc: &Toolchain) -> Option<PathBuf> {
    let bin = linker_root(tc.llvm_major).join("bin").join("bpf-linker");
    let runs = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    runs.then_some(bin)
}

fn has_rust_src(tc: &Toolchain) -> bool {
    tc.sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

/// Installs what [`build`] needs, idempotently, saying what it does.
pub fn provision(tc: &Toolchain, say: &mut dyn FnMut(&str)) -> Result<()> {
    if has_rust_src(tc) {
        say(&format!("rust-src for {}: present", tc.name));
    } else {
        say(&format!(
            "rust-src for {}: missing, installing with rustup",
            tc.name
        ));
        let status = Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", &tc.name])
            .status()
            .map_err(|e| err(format!("cannot run rustup: {e}")))?;
        if !status.success() {
            return Err(err(format!(
                "`rustup component add rust-src --toolchain {}` failed",
                tc.name
            )));
        }
    }

    if let Some(bin) = linker(tc) {
        say(&format!("bpf-linker: present ({})", bin.display()));
        return Ok(());
    }
    let root = linker_root(tc.llvm_major);
    say(&format!(
        "bpf-linker: missing, building it from crates.io against {}'s LLVM {} into {} (about 2 minutes)",
        tc.name,
        tc.llvm_major,
        root.display()
    ));
    // bpf-linker links libLLVM dynamically; point LLVM_PREFIX at a directory
    // whose lib/ holds the toolchain's own libLLVM under the names its build
    // script looks for.
    let lib = fs::read_dir(tc.sysroot.join("lib"))
        .map_err(|e| err(format!("cannot read {}/lib: {e}", tc.sysroot.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .ok_or_else(|| {
            err(format!(
                "no libLLVM.so.* in {}/lib: this toolchain cannot host bpf-linker",
                tc.sysroot.display()
            ))
        })?;
    let prefix = root.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .map_err(|e| err(format!("cannot create {}: {e}", prefix_lib.display())))?;
    let lib_name = lib.file_name().unwrap_or_default().to_owned();
    for name in [OsString::from("libLLVM.so"), lib_name] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .map_err(|e| err(format!("cannot link {}: {e}", link.display())))?;
    }
    let status = rustup_run(&tc.name, "cargo")
        .args(["install", "bpf-linker", "--locked", "--force"])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{}", tc.llvm_major))
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .map_err(|e| err(format!("cannot run cargo install: {e}")))?;
    if !status.success() || linker(tc).is_none() {
        return Err(err("building bpf-linker failed (see the output above)"));
    }
    say("bpf-linker: built");
    Ok(())
}

/// Compiles `sentinel-ebpf` (in `ebpf_dir`) into `target_dir` and returns the
/// path of the object. Does not install anything.
pub fn build(ebpf_dir: &Path, target_dir: &Path, tc: &Toolchain) -> Result<PathBuf> {
    if !has_rust_src(tc) {
        return Err(err(format!(
            "rust-src is not installed for the {} toolchain: run `cargo xtask build-ebpf` once, it installs what the eBPF build needs",
            tc.name
        )));
    }
    let linker = linker(tc).ok_or_else(|| {
        err(format!(
            "bpf-linker for LLVM {} is not in {}: run `cargo xtask build-ebpf` once, it builds it",
            tc.llvm_major,
            linker_root(tc.llvm_major).display()
        ))
    })?;
    let linker_dir = linker.parent().unwrap_or(Path::new("."));
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_dir.to_path_buf()];
    paths.extend(env::split_paths(&path));
    let path = env::join_paths(paths).map_err(|e| err(format!("bad PATH: {e}")))?;

    let mut cmd = rustup_run(&tc.name, "cargo");
    cmd.current_dir(ebpf_dir)
        .args(["build", "--release", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        .env("PATH", path);
    if tc.bootstrap {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    let status = cmd
        .status()
        .map_err(|e| err(format!("cannot run cargo for the eBPF crate: {e}")))?;
    if !status.success() {
        return Err(err("building the eBPF crate failed (see the output above)"));
    }
    let object = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join("sentinel-ebpf");
    if !object.exists() {
        return Err(err(format!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        )));
    }
    Ok(object)
}
