//! Child processes: say what runs, keep their stdout off ours, and turn a failure into an error that
//! names the command.

use std::{
    env, io,
    os::fd::AsFd,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// A command for a nested cargo (or rustup) whose environment lacks what cargo sets for a build
/// script and for `cargo run`, so that it sees the same environment however xtask was started. Cargo sets variables but never
/// clears them: a leftover `CARGO_CFG_*` would describe the host to the nested build's scripts, and a
/// leftover `HOST` changes fingerprints (aya's build scripts track it), so that every switch
/// between `cargo xtask` and `cargo build` would rebuild the eBPF crates.
pub fn nested_cargo(program: &str) -> Command {
    const PREFIXES: [&str; 4] = ["CARGO_CFG_", "CARGO_FEATURE_", "CARGO_PKG_", "DEP_"];
    const NAMES: [&str; 21] = [
        "CARGO",
        "CARGO_BIN_NAME",
        "CARGO_CRATE_NAME",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_LINKS",
        "CARGO_MANIFEST_PATH",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_RUSTC_CURRENT_DIR",
        "CARGO_TARGET_TMPDIR",
        "DEBUG",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "OUT_DIR",
        "PROFILE",
        "RUSTC",
        "RUSTC_LINKER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "TARGET",
    ];
    let mut cmd = Command::new(program);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if NAMES.contains(&key) || PREFIXES.iter().any(|prefix| key.starts_with(prefix)) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Our stderr, as a child's stdout. A build script talks to cargo over stdout, so a child that
/// prints there could inject `cargo:` instructions.
pub fn stderr() -> Result<Stdio> {
    let fd = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("failed to duplicate stderr")?;
    Ok(fd.into())
}

/// Runs `cmd` to completion, its output going to our stderr.
pub fn run(cmd: &mut Command) -> Result<()> {
    crate::log(format_args!("running `{}`", describe(cmd)));
    let status = cmd
        .stdin(Stdio::null())
        .stdout(stderr()?)
        .status()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout. The error of a failed command carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}
