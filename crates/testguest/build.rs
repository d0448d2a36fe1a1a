//! Builds the test guest (`guest/`, a standalone no_std package) with a
//! nested `cargo build` and hands its path to the library as
//! `FERRY_GUEST_ELF`.
//!
//! The nested build gets its own target directory under OUT_DIR (the outer
//! cargo holds the lock on the workspace's), an explicit `--target` (so the
//! flags below apply to the guest only, never to a build script), and the
//! guest's flags through `CARGO_ENCODED_RUSTFLAGS`. Everything the outer
//! cargo (or a wrapper such as clippy or a coverage tool) put into the
//! environment that would change how the guest is compiled is removed
//! first.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir.join("../../guest");
    let guest_dir = guest_dir.canonicalize().unwrap_or_else(|e| {
        panic!(
            "the guest sources are missing at {}: {e}",
            guest_dir.display()
        )
    });
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("guest-target");

    for path in ["src", "Cargo.toml", "Cargo.lock", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--offline",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        if let Some(key) = key.to_str() {
            if inherited_but_harmful(key) {
                cmd.env_remove(key);
            }
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        guest_rustflags(&guest_dir.join("link.ld")).join("\x1f"),
    );

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
    if !output.status.success() {
        panic!(
            "building the test guest failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let elf = target_dir.join(TARGET).join("release").join("ferry-guest");
    assert!(
        elf.is_file(),
        "the guest build succeeded but {} is missing",
        elf.display()
    );
    println!("cargo:rustc-env=FERRY_GUEST_ELF={}", elf.display());
}

/// Flags for a static, non-PIE, freestanding ELF linked at 1 MiB by the
/// guest's own linker script (`panic = "abort"` is in guest/Cargo.toml).
fn guest_rustflags(link_script: &Path) -> Vec<String> {
    let mut flags = vec!["-Crelocation-model=static".to_owned()];
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        &format!("-Wl,-T,{}", link_script.display()),
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        "-Wl,-z,norelro",
    ] {
        flags.push(format!("-Clink-arg={arg}"));
    }
    flags
}

/// Environment variables of the outer build that must not reach the nested
/// one: flags and wrappers meant for the host crates (clippy, coverage,
/// sanitizers), its target selection and target directory, its profile
/// overrides, and cargo's per-crate variables. The jobserver
/// (`CARGO_MAKEFLAGS`) stays, so the nested build shares the outer job
/// limit.
fn inherited_but_harmful(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_CRATE_NAME",
    ];
    const PREFIXES: &[&str] = &[
        "CARGO_BUILD_",
        "CARGO_TARGET_",
        "CARGO_PROFILE_",
        "CARGO_PKG_",
        "CARGO_CFG_",
        "CARGO_FEATURE_",
    ];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}
