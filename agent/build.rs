//! Builds the kernel programs (ebpf/) into `$OUT_DIR/ambit-ebpf`, which the loader embeds with
//! `aya::include_bytes_aligned!`. A plain `cargo build` therefore needs nothing installed by hand:
//! xtask installs the nightly's rust-src and bpf-linker on first use.

use std::{env, path::PathBuf, process};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("agent/ sits in the workspace root");
    // The workspace manifest holds the eBPF release profile.
    for input in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "ebpf/common/src",
        "ebpf/common/Cargo.toml",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
    // Only when present: cargo reruns a build script on every build while a watched file is missing.
    for input in ["ebpf/build.rs", "ebpf/common/build.rs"] {
        let path = root.join(input);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    if let Err(err) = xtask::ebpf::build_ebpf(&out_dir) {
        // Cargo prints this under "--- stderr", after the eBPF build's own output.
        eprintln!("\nerror: {err:#}\n\nTo run the eBPF build alone: cargo xtask build-ebpf");
        process::exit(1);
    }
}
