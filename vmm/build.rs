//! Builds the test guest (resources/guest) for x86_64-unknown-none and
//! places it in OUT_DIR so the `abide` binary can embed it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest = manifest_dir.join("../resources/guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    // The fuzz targets (fuzz/, built with --cfg fuzzing) never boot the
    // embedded guest: an empty placeholder spares them the guest build and
    // the x86_64-unknown-none target on the nightly toolchain.
    println!("cargo:rerun-if-env-changed=CARGO_CFG_FUZZING");
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        std::fs::write(out.join("abide-guest.elf"), b"")
            .unwrap_or_else(|e| panic!("cannot write the placeholder guest: {e}"));
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out.join("guest-target");
    let status = Command::new(&cargo)
        .current_dir(&guest)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--manifest-path",
        ])
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build must not leak into the guest build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_MAKEFLAGS")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "building the test guest failed ({s}); is the x86_64-unknown-none target installed? \
             Run resources/scripts/setup.sh (it runs `rustup target add x86_64-unknown-none`)"
        ),
        Err(e) => panic!("cannot run {cargo} to build the test guest: {e}"),
    }
    let elf = target_dir.join("x86_64-unknown-none/release/abide-guest");
    std::fs::copy(&elf, out.join("abide-guest.elf"))
        .unwrap_or_else(|e| panic!("cannot copy the guest ELF {}: {e}", elf.display()));
}
