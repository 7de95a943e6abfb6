//! The Debian tools the benches drive (`h2load` from nghttp2-client, `haproxy`): found on PATH, or
//! installed with apt-get on first use, as `cargo xtask` installs its own.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The path of `binary`, installing Debian's `package` first if it is not on PATH. Exits with a
/// message when it cannot be had (not root, not Debian, no network).
pub fn ensure(binary: &str, package: &str) -> PathBuf {
    if let Some(p) = which(binary) {
        return p;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("error: {binary} not found; install it with `apt-get install -y {package}`");
        std::process::exit(1);
    }
    eprintln!("[bench] {binary} not found: installing Debian package {package} (first use)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // A fresh machine may have no package lists yet.
    if !install() {
        let _ = Command::new("apt-get")
            .arg("update")
            .stdin(Stdio::null())
            .status();
        install();
    }
    which(binary).unwrap_or_else(|| {
        eprintln!("error: `apt-get install -y {package}` did not provide {binary}");
        std::process::exit(1)
    })
}

fn which(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

/// The first line of `<binary> <flag>`, e.g. its version.
pub fn version(binary: &PathBuf, flag: &str) -> String {
    Command::new(binary)
        .arg(flag)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_else(|e| format!("({}: {e})", binary.display()))
}
