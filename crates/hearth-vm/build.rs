//! Builds the guest agent (`crates/hearth-agent`) as one static binary and
//! hands it to `assets.rs` to embed, so an ordinary `cargo build [--release]`
//! yields a `hearth` that carries the agent its guests boot with, and an
//! installed `hearth` is one self-contained file.
//!
//! Why a nested cargo: the agent is the guest's PID 1 in an initramfs with no
//! libc, so it must be linked with `-C target-feature=+crt-static`. Cargo
//! cannot set that flag for one binary of a workspace (a `[target]` rustflag
//! would make the host binaries and build scripts static too), so this script
//! runs `cargo build -p hearth-agent` with the flag, for an explicit target
//! (which keeps the flag off build scripts and proc macros), into its own
//! target directory (the outer build holds the lock on the usual one).
//!
//! `HEARTH_EMBED_AGENT=0` skips it (hearth then looks for `HEARTH_AGENT` or a
//! static `hearth-agent` beside the executable at run time).

use std::path::{Path, PathBuf};
use std::process::Command;

const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hearth_embedded_agent)");
    println!("cargo:rerun-if-env-changed=HEARTH_EMBED_AGENT");
    if std::env::var("HEARTH_EMBED_AGENT").as_deref() == Ok("0") {
        return;
    }
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let Some(workspace) = manifest_dir.parent().and_then(Path::parent) else {
        return;
    };
    let agent_src = workspace.join("crates/hearth-agent");
    if !agent_src.join("Cargo.toml").is_file() {
        // Built outside the source tree (e.g. from a packaged crate): nothing to
        // embed; the run-time lookup applies.
        println!("cargo:warning=hearth-agent sources not found; the agent is not embedded");
        return;
    }
    for dir in ["crates/hearth-agent", "crates/hearth-proto"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );

    let out_dir = PathBuf::from(env("OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/hearth-vm-<hash>/out: keep the agent's
    // build beside the outer one, so `cargo clean` removes it and rebuilds reuse it.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map_or_else(|| out_dir.join("agent-target"), |t| t.join("agent"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "hearth-agent",
            "--target",
            AGENT_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static");
    // The outer build's settings are not the agent's: its flags, its target, and
    // clippy's wrapper (under `cargo clippy` the agent is linted on its own).
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .unwrap_or_else(|err| panic!("cannot run cargo to build the static hearth-agent: {err}"));
    if !status.success() {
        panic!("building the static hearth-agent failed ({status}); see the output above");
    }
    let built = target_dir.join(AGENT_TARGET).join("release/hearth-agent");
    let embedded = out_dir.join("hearth-agent");
    std::fs::copy(&built, &embedded)
        .unwrap_or_else(|err| panic!("cannot copy {}: {err}", built.display()));
    println!("cargo:rustc-cfg=hearth_embedded_agent");
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}
