//! Compiles the eBPF crate and hands the object to `include_bytes!`, so the
//! `sentinel` binary carries its kernel program and one file is all an
//! operator installs.
//!
//! `SENTINEL_EBPF_OBJECT=/path/to/object` skips the nested build and embeds
//! that file instead (xtask uses it after building the object itself).

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SENTINEL_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("sentinel-user lives in the workspace root");
    let ebpf_dir = root.join("sentinel-ebpf");
    for path in ["src", "Cargo.toml", "Cargo.lock", ".cargo"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(path).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("sentinel-common/src").display()
    );

    let object = match env::var_os("SENTINEL_EBPF_OBJECT") {
        Some(path) => {
            // The object itself, not only the sources it was built from: a
            // build with another feature set has its own copy of this
            // script's output, which must not keep an older object.
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            path
        }
        None => {
            let target_dir = root.join("target").join("ebpf");
            let built = sentinel_build::toolchain()
                .and_then(|tc| sentinel_build::build(&ebpf_dir, &target_dir, &tc));
            match built {
                Ok(object) => object,
                Err(error) => {
                    eprintln!("error: cannot build the eBPF program: {error}");
                    std::process::exit(1);
                }
            }
        }
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("sentinel.bpf.o");
    if let Err(error) = fs::copy(&object, &out) {
        eprintln!("error: cannot copy {}: {error}", object.display());
        std::process::exit(1);
    }
}
