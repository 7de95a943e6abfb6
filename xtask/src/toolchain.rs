//! The eBPF toolchain: a nightly rustc with rust-src (for `-Z build-std=core`) and a bpf-linker
//! linked against that nightly's own LLVM. [`ensure_toolchain`] installs whatever is missing or stale,
//! under a lock, so a fresh machine needs nothing but rustup and a C toolchain.

use std::{
    env,
    fs::{self, File, OpenOptions, TryLockError},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{self, Command},
};

use anyhow::{anyhow, Context as _, Result};

use crate::{cmd, log};

/// The rustup toolchain that builds the kernel programs. It must be a nightly: `-Z build-std`.
pub const NIGHTLY: &str = "nightly";

/// The toolchain that builds bpf-linker itself.
const STABLE: &str = "stable";

/// bpf-linker 0.13 has `llvm-21`..`llvm-23` features. A nightly on a newer LLVM needs a newer
/// bpf-linker: the install then fails saying the `llvm-<major>` feature is missing.
const BPF_LINKER_VERSION: &str = "^0.13";

/// Next to the installed binary, it records what the binary was built against (see [`stamp`]).
const STAMP: &str = ".bpf-linker-ambit-stamp";

/// Makes sure the nightly toolchain, its rust-src and a matching bpf-linker are installed.
///
/// Cheap when all is in place (three short commands). Two builds running at once, such as the
/// agent's build script under clippy and under test, take turns through a lock file in `CARGO_HOME`.
pub fn ensure_toolchain() -> Result<()> {
    let cargo_home = cargo_home()?;
    let _lock = lock(&cargo_home)?;
    let nightly = ensure_nightly()?;
    ensure_rust_src(&nightly)?;
    ensure_bpf_linker(&cargo_home, &nightly)
}

/// `CARGO_HOME`, where `cargo install` puts binaries (under `bin/`).
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// The bpf-linker [`ensure_toolchain`] manages. Callers put its directory first in the eBPF build's
/// PATH, since rustc finds the linker by name.
pub fn bpf_linker_path(cargo_home: &Path) -> PathBuf {
    cargo_home.join("bin").join("bpf-linker")
}

/// Held until dropped. The kernel releases a `flock` when its holder dies, so no lock goes stale.
fn lock(cargo_home: &Path) -> Result<File> {
    fs::create_dir_all(cargo_home)
        .with_context(|| format!("failed to create {}", cargo_home.display()))?;
    let path = cargo_home.join(".ambit-toolchain.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(TryLockError::WouldBlock) => {
            log(format_args!(
                "another build is checking the eBPF toolchain; waiting for {}",
                path.display()
            ));
        }
        Err(TryLockError::Error(err)) => {
            return Err(err).with_context(|| format!("failed to lock {}", path.display()));
        }
    }
    file.lock()
        .with_context(|| format!("failed to lock {}", path.display()))?;
    Ok(file)
}

/// What [`ensure_nightly`] learned about the nightly toolchain.
struct Nightly {
    /// `rustc -vV`: names the exact build, so it tells when bpf-linker must be rebuilt.
    version: String,
    /// "22" from "LLVM version: 22.1.4".
    llvm_major: String,
    sysroot: PathBuf,
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn nightly_rustc(args: &[&str]) -> Result<String> {
    let mut cmd = rustup();
    cmd.args(["run", NIGHTLY, "rustc"]).args(args);
    cmd::output(&mut cmd)
}

fn ensure_nightly() -> Result<Nightly> {
    let version = match nightly_rustc(&["-vV"]) {
        Ok(version) => version,
        Err(err) => {
            let installed = cmd::output(rustup().args(["toolchain", "list"])).context(
                "rustup is needed to build the eBPF programs (https://rustup.rs); is it on PATH?",
            )?;
            if installed
                .lines()
                .any(|line| line.starts_with(&format!("{NIGHTLY}-")))
            {
                return Err(err.context(format!("the {NIGHTLY} toolchain is installed but broken")));
            }
            log(format_args!("installing the {NIGHTLY} toolchain"));
            cmd::run(rustup().args([
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            nightly_rustc(&["-vV"])?
        }
    };
    let llvm_major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .filter(|major| !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            anyhow!("no \"LLVM version: N.x\" line in `rustc +{NIGHTLY} -vV`:\n{version}")
        })?
        .to_owned();
    let sysroot = PathBuf::from(nightly_rustc(&["--print", "sysroot"])?.trim());
    Ok(Nightly {
        version,
        llvm_major,
        sysroot,
    })
}

fn ensure_rust_src(nightly: &Nightly) -> Result<()> {
    if nightly.sysroot.join("lib/rustlib/src/rust").is_dir() {
        return Ok(());
    }
    log(format_args!(
        "{NIGHTLY} has no rust-src (needed for -Z build-std=core); adding it"
    ));
    cmd::run(rustup().args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// What a bpf-linker must have been built against to be reused; a change forces a rebuild.
fn stamp(nightly: &Nightly) -> String {
    format!(
        "bpf-linker {BPF_LINKER_VERSION} --features llvm-{}\n{}",
        nightly.llvm_major, nightly.version
    )
}

fn ensure_bpf_linker(cargo_home: &Path, nightly: &Nightly) -> Result<()> {
    let linker = bpf_linker_path(cargo_home);
    let stamp_path = cargo_home.join("bin").join(STAMP);
    let want = stamp(nightly);
    // bpf-linker loads the nightly's libLLVM at run time (rpath): a nightly update that removes or
    // replaces that library breaks it, so a working `--version` is not enough, the stamp must match.
    let reason = if !linker.exists() {
        "not installed".to_owned()
    } else if let Err(err) = linker_version(&linker) {
        format!("it does not run ({err:#})")
    } else {
        match fs::read_to_string(&stamp_path) {
            Ok(have) if have == want => return Ok(()),
            Ok(_) => format!("it was built for another {NIGHTLY}"),
            Err(_) => format!(
                "{} is missing, so its LLVM is unknown",
                stamp_path.display()
            ),
        }
    };
    log(format_args!(
        "bpf-linker: {reason}; building it against {NIGHTLY}'s LLVM {} (1-2 minutes)",
        nightly.llvm_major
    ));
    install_bpf_linker(cargo_home, nightly)?;
    let version =
        linker_version(&linker).context("the freshly installed bpf-linker does not run")?;
    fs::write(&stamp_path, want)
        .with_context(|| format!("failed to write {}", stamp_path.display()))?;
    log(format_args!("installed {}", version.trim()));
    Ok(())
}

fn linker_version(linker: &Path) -> Result<String> {
    cmd::output(Command::new(linker).arg("--version"))
}

/// Builds bpf-linker against the nightly's own `libLLVM.so.<major>.*-rust-*`, with an rpath to it,
/// so its LLVM matches the bitcode rustc emits. bpf-linker's build looks for `$LLVM_PREFIX/lib/libLLVM.so`.
fn install_bpf_linker(cargo_home: &Path, nightly: &Nightly) -> Result<()> {
    let llvm_lib_dir = nightly.sysroot.join("lib");
    let libllvm = find_libllvm(&llvm_lib_dir, &nightly.llvm_major)?;
    let prefix = env::temp_dir().join(format!("ambit-bpf-linker-llvm-{}", process::id()));
    let _ = fs::remove_dir_all(&prefix);
    fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("failed to create {}", prefix.display()))?;
    let result = symlink(&libllvm, prefix.join("lib/libLLVM.so"))
        .with_context(|| {
            format!(
                "failed to link {} into {}",
                libllvm.display(),
                prefix.display()
            )
        })
        .and_then(|()| {
            // Without what a cargo running us as a build script set (clippy sets a rustc wrapper).
            let mut cmd = cmd::nested_cargo("rustup");
            cmd.args(["run", STABLE, "cargo", "install", "bpf-linker"])
                .args(["--version", BPF_LINKER_VERSION, "--locked", "--force"])
                .args(["--no-default-features", "--features"])
                .arg(format!("llvm-{}", nightly.llvm_major))
                .arg("--root")
                .arg(cargo_home)
                .env("LLVM_PREFIX", &prefix);
            // The encoded form keeps a sysroot path with spaces in one argument.
            let mut rustflags = std::ffi::OsString::from("-C\x1flink-arg=-Wl,-rpath,");
            rustflags.push(&llvm_lib_dir);
            cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags);
            // Nor the caller's own flags and target directory.
            cmd.env_remove("RUSTFLAGS").env_remove("CARGO_TARGET_DIR");
            cmd::run(&mut cmd)
        });
    let _ = fs::remove_dir_all(&prefix);
    result.context(
        "failed to build bpf-linker (a C compiler is needed: apt-get install build-essential)",
    )
}

fn find_libllvm(lib_dir: &Path, major: &str) -> Result<PathBuf> {
    let prefix = format!("libLLVM.so.{major}.");
    let mut found: Vec<PathBuf> = fs::read_dir(lib_dir)
        .with_context(|| format!("failed to list {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix) && name.contains("-rust-"))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow!(
            "no {prefix}*-rust-* in {}: bpf-linker needs the {NIGHTLY} toolchain's own LLVM",
            lib_dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_names_the_nightly_build() {
        let nightly = Nightly {
            version: "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nLLVM version: 22.1.4\n".into(),
            llvm_major: "22".into(),
            sysroot: PathBuf::new(),
        };
        let stamp = stamp(&nightly);
        assert!(stamp.contains("llvm-22"), "{stamp}");
        assert!(stamp.contains("e50aa6fba 2026-05-19"), "{stamp}");
    }

    #[test]
    fn finds_the_rust_libllvm_of_the_major() {
        let dir = env::temp_dir().join(format!("xtask-find-libllvm-{}", process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.21.1-rust-1.96.0-nightly",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
        ] {
            fs::write(dir.join(name), b"").unwrap();
        }
        let found = find_libllvm(&dir, "22").unwrap();
        assert!(
            found.ends_with("libLLVM.so.22.1-rust-1.97.0-nightly"),
            "{found:?}"
        );
        assert!(
            find_libllvm(&dir, "23").is_err(),
            "no LLVM 23 library was made"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
