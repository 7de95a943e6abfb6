//! ambit's build tasks. The library builds the kernel programs and installs the toolchain they need
//! (agent/build.rs calls [`ebpf::build_ebpf`]); the `xtask` binary adds `cargo xtask test|demo|build-ebpf`.

pub mod cmd;
pub mod containerd;
pub mod ebpf;
pub mod toolchain;

use std::{
    env,
    path::{Path, PathBuf},
};

/// The cargo profile of the image `cargo xtask test` builds and runs (xtask/tests/image.rs): the
/// dev profile without debug info (Cargo.toml). The shipped image (`cargo xtask image`, the
/// Dockerfile) is built with `release`.
pub const IMAGE_TEST_PROFILE: &str = "image-test";

/// What `cargo xtask test` passes `cargo test` before anything else: every package that builds for
/// the host. A nested build that needs one of the workspace's binaries (tests/cni.rs) uses the
/// same selection, so cargo unifies the same features and finds the binary already built.
pub const WORKSPACE_TEST_ARGS: [&str; 4] = ["test", "--workspace", "--exclude", ebpf::PACKAGE];

/// The workspace root. xtask is only ever built from its path inside this workspace, so its own
/// manifest directory finds the root both under `cargo xtask` and inside agent/build.rs.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ sits in the workspace root")
}

/// The workspace's cargo target directory: `CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        // A relative value is taken from the root: a build script runs in its package's directory.
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// Progress goes to stderr: inside a build script, stdout is cargo's instruction channel.
fn log(msg: impl std::fmt::Display) {
    eprintln!("[xtask] {msg}");
}
