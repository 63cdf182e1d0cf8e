//! `cargo xtask`: building, running, testing and benchmarking Sentinel on a
//! fresh machine with no manual step. Every prerequisite is installed here,
//! idempotently, with one line saying what each step does.

mod bench;
mod prereq;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and benchmark Sentinel"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install rust-src and bpf-linker when missing, then build the eBPF object.
    BuildEbpf,
    /// Build the eBPF object and the `sentinel` binary (release).
    Build,
    /// Build everything and run the daemon with config/sentinel.kdl (as root).
    Run {
        /// Configuration file.
        #[arg(long, default_value = "config/sentinel.kdl")]
        config: PathBuf,
    },
    /// Run every test, privileged ones included.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks, printed side by side with their peers.
    #[command(subcommand)]
    Bench(bench::Bench),
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Prints a step, as every step of xtask does.
pub fn step(message: &str) {
    eprintln!("==> {message}");
}

/// Runs a command, failing with its rendering if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Installs the eBPF toolchain pieces and builds the object; returns its path.
pub fn build_ebpf() -> Result<PathBuf> {
    step("eBPF toolchain");
    let tc = sentinel_build::toolchain()?;
    sentinel_build::provision(&tc, &mut |m| eprintln!("    {m}"))?;
    step(&format!(
        "building sentinel-ebpf with {} (LLVM {})",
        tc.name, tc.llvm_major
    ));
    let root = root();
    let object =
        sentinel_build::build(&root.join("sentinel-ebpf"), &root.join("target/ebpf"), &tc)?;
    eprintln!("    {}", object.display());
    Ok(object)
}

/// `cargo` for the host workspace, embedding an already-built object.
pub fn cargo(object: &Path) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root()).env("SENTINEL_EBPF_OBJECT", object);
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf => {
            build_ebpf()?;
        }
        Cmd::Build => {
            let object = build_ebpf()?;
            step("building sentinel (release)");
            run(cargo(&object).args(["build", "--release", "-p", "sentinel-user"]))?;
            eprintln!("    {}", root().join("target/release/sentinel").display());
        }
        Cmd::Run { config } => {
            let object = build_ebpf()?;
            step("building sentinel (release)");
            run(cargo(&object).args(["build", "--release", "-p", "sentinel-user"]))?;
            if !is_root() {
                bail!(
                    "the daemon loads XDP programs and mounts bpffs: run `cargo xtask run` as root"
                );
            }
            let bin = root().join("target/release/sentinel");
            let config = if config.is_absolute() {
                config
            } else {
                root().join(config)
            };
            step(&format!(
                "starting {} run --config {}",
                bin.display(),
                config.display()
            ));
            eprintln!(
                "    stop it with Ctrl-C; in another shell try `{} stats` or `{} deny list`",
                bin.display(),
                bin.display()
            );
            let status = Command::new(&bin)
                .arg("run")
                .arg("--config")
                .arg(&config)
                .status()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            if !status.success() {
                bail!("sentinel exited with {status}");
            }
        }
        Cmd::Test { args } => test(&args)?,
        Cmd::Bench(which) => bench::run(which)?,
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    prereq::ensure_test_packages()?;
    let object = build_ebpf()?;
    step("building the workspace and its tests");
    run(cargo(&object).args(["build", "--workspace", "--all-targets"]))?;
    let bin = root().join("target/debug/sentinel");
    if is_root() {
        step("running every test (privileged tests included: running as root)");
    } else {
        eprintln!(
            "    SKIPPED: privileged tests (XDP, network namespaces) need root; they will report SKIPPED"
        );
        step("running every test");
    }
    run(cargo(&object)
        .args(["test", "--workspace", "--no-fail-fast"])
        .arg("--")
        .args(args)
        .env("SENTINEL_BIN", &bin))
}
