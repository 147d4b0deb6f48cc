//! Link the guest with its own linker script, as a static non-PIE ELF
//! loaded at 1 MiB. Using absolute paths means the build works no matter
//! which directory cargo is invoked from (the VMM's build.rs uses
//! `--manifest-path` and its own `--target-dir`).

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    // The x86_64-unknown-none target defaults to static-pie; the guest runs
    // at its link address and its 32-bit boot code uses absolute
    // relocations, so link a plain static executable instead.
    println!("cargo:rustc-link-arg-bins=--no-pie");
    println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
    println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
    println!("cargo:rustc-link-arg-bins=--build-id=none");
    println!("cargo:rustc-link-arg-bins=--gc-sections");
}
