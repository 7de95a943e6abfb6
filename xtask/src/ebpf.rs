//! Building the kernel programs (package `ambit-ebpf`) into the one BPF object the agent embeds.

use std::{
    env,
    ffi::OsString,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cmd, log,
    toolchain::{self, NIGHTLY},
};

/// The package, and the name of its bin target and of the object.
pub const PACKAGE: &str = "ambit-ebpf";

/// Little-endian BPF: the agent runs on x86_64 and aarch64.
pub const TARGET: &str = "bpfel-unknown-none";

/// One target directory for every eBPF build, whichever host profile or command asks for it, so
/// clippy, test and release builds share a single build of `core` (cold about 30 s, warm about 6 s).
pub fn target_dir() -> PathBuf {
    crate::target_dir().join("ebpf")
}

/// Builds the kernel programs and copies the object to `out/ambit-ebpf`, returning that path.
///
/// Installs the toolchain first if needed ([`toolchain::ensure_toolchain`]). The child cargo's
/// output is relayed to stderr. Inside a build script its warnings are also raised as
/// `cargo:warning`, because cargo shows a build script's stderr only when it fails.
pub fn build_ebpf(out: &Path) -> Result<PathBuf> {
    toolchain::ensure_toolchain()?;
    let cargo_home = toolchain::cargo_home()?;
    let target_dir = target_dir();

    // Among others without RUSTC and RUSTC_WORKSPACE_WRAPPER: the stable rustc, or clippy-driver.
    let mut cmd = cmd::nested_cargo("rustup");
    cmd.args(["run", NIGHTLY, "cargo", "build", "--package", PACKAGE])
        .args([
            "--bins",
            "--release",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(crate::workspace_root())
        // The same flags as aya-build 0.2.0: aya-ebpf needs the cfg; BTF needs debuginfo.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!(
                "--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
                bpf_target_arch()
            ),
        )
        // rustc finds `bpf-linker` by name: make it the one ensure_toolchain built.
        .env("PATH", path_with(&cargo_home.join("bin")))
        .stdin(Stdio::null())
        .stdout(cmd::stderr()?)
        .stderr(Stdio::piped());

    log(format_args!("running `{}`", cmd::describe(&cmd)));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{}`", cmd::describe(&cmd)))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let errors = relay(BufReader::new(stderr), in_build_script());
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{}`", cmd::describe(&cmd)))?;
    if !status.success() {
        let mut msg = format!(
            "building the eBPF programs failed: `{}` ({status})",
            cmd::describe(&cmd)
        );
        for line in &errors {
            msg.push_str("\n  ");
            msg.push_str(line);
        }
        msg.push_str("\nThe eBPF build's full output is above.");
        bail!(msg);
    }

    let object = target_dir.join(TARGET).join("release").join(PACKAGE);
    fs::create_dir_all(out).with_context(|| format!("failed to create {}", out.display()))?;
    let dest = out.join(PACKAGE);
    fs::copy(&object, &dest)
        .with_context(|| format!("failed to copy {} to {}", object.display(), dest.display()))?;
    Ok(dest)
}

/// The `bpf_target_arch` cfg aya-ebpf reads: the architecture the agent is built for.
fn bpf_target_arch() -> String {
    // Cargo gives build scripts the target's arch; `cargo xtask` builds for the host.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| env::consts::ARCH.to_owned());
    if arch.starts_with("riscv64") {
        "riscv64".to_owned()
    } else {
        arch
    }
}

/// Cargo sets `CARGO_CFG_*` only for build scripts.
fn in_build_script() -> bool {
    env::var_os("CARGO_CFG_TARGET_ARCH").is_some()
}

fn path_with(dir: &Path) -> OsString {
    let rest = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(env::split_paths(&rest).filter(|d| d != dir));
    env::join_paths(dirs).unwrap_or(rest)
}

/// Copies the child's stderr to ours and returns its error headlines, each with its location, for
/// the error message. With `warn`, warning headlines also become `cargo:warning` lines.
fn relay(stderr: impl BufRead, warn: bool) -> Vec<String> {
    let mut errors = Vec::new();
    // A diagnostic's headline, waiting for the ` --> file:line` that follows it.
    let mut pending: Option<String> = None;
    let finish = |headline: String, errors: &mut Vec<String>| {
        if headline.starts_with("error") {
            if errors.len() < 20 {
                errors.push(headline);
            }
        } else if warn && !is_summary(&headline) {
            println!("cargo:warning={PACKAGE}: {headline}");
        }
    };
    for line in stderr.lines() {
        let Ok(line) = line else { break };
        eprintln!("{line}");
        if let Some(location) = line.trim_start().strip_prefix("--> ") {
            if let Some(headline) = pending.take() {
                finish(format!("{headline} ({location})"), &mut errors);
            }
            continue;
        }
        if let Some(headline) = pending.take() {
            finish(headline, &mut errors);
        }
        if line.starts_with("error") || line.starts_with("warning") {
            pending = Some(line);
        }
    }
    if let Some(headline) = pending {
        finish(headline, &mut errors);
    }
    errors
}

/// "warning: `ambit-ebpf` (bin "ambit-ebpf") generated 1 warning": it repeats the warnings.
fn is_summary(headline: &str) -> bool {
    headline.starts_with("warning: `") && headline.contains(") generated ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_pairs_errors_with_their_location() {
        let stderr = "   Compiling ambit-ebpf v0.1.0\n\
                      error[E0425]: cannot find value `x` in this scope\n  \
                      --> ebpf/src/main.rs:10:5\n   |\n\
                      warning: unused import\n  --> ebpf/src/main.rs:3:5\n\
                      error: could not compile `ambit-ebpf` (bin \"ambit-ebpf\") due to 1 previous error\n";
        let errors = relay(stderr.as_bytes(), false);
        assert!(is_summary(
            "warning: `ambit-ebpf` (bin \"ambit-ebpf\") generated 1 warning"
        ));
        assert!(!is_summary("warning: unused import"));
        assert_eq!(
            errors,
            [
                "error[E0425]: cannot find value `x` in this scope (ebpf/src/main.rs:10:5)",
                "error: could not compile `ambit-ebpf` (bin \"ambit-ebpf\") due to 1 previous error",
            ]
        );
    }
}
