//! The image and network config a test runs containers with: a busybox image built with umoci,
//! and a bridge + host-local + loopback conflist.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::cmd;

/// Builds a tiny OCI image with umoci: busybox-static's `/bin/busybox` and a symlink per applet
/// in `/bin`, `PATH=/bin`, no default command. Returns the OCI layout tarball written into `dir`
/// (import it with [`Containerd::import`]).
pub fn busybox_image(dir: &Path) -> Result<PathBuf> {
    let layout = dir.join("busybox-layout");
    let staging = dir.join("busybox-rootfs");
    let tarball = dir.join("busybox.oci.tar");
    let _ = fs::remove_dir_all(&layout);
    let _ = fs::remove_dir_all(&staging);
    let bin = staging.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("failed to create {}", bin.display()))?;
    let busybox = Path::new("/bin/busybox");
    fs::copy(busybox, bin.join("busybox"))
        .context("failed to copy /bin/busybox (is the Debian package busybox-static installed?)")?;
    let applets = cmd::output(Command::new(busybox).arg("--list"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))
                .with_context(|| format!("failed to link applet {applet}"))?;
        }
    }
    let image = format!("{}:latest", layout.display());
    cmd::output(
        Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(&layout),
    )
    .context("umoci init failed (is the Debian package umoci installed?)")?;
    cmd::output(Command::new("umoci").args(["new", "--image", &image]))?;
    cmd::output(
        Command::new("umoci")
            .args(["insert", "--image", &image])
            .arg(&bin)
            .arg("/bin"),
    )?;
    cmd::output(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/bin",
    ]))?;
    cmd::output(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&tarball)
            .arg("."),
    )?;
    Ok(tarball)
}

/// A conflist for `ctr run --cni`: `bridge` (with `host-local` IPAM on `subnet`, the bridge the
/// gateway, a default route) then `loopback`, then the `extra` plugin objects (raw JSON) in
/// order. `cni_version` is e.g. `1.0.0` or `0.4.0`. host-local keeps its leases under the
/// harness's cache dir (its default /var/lib/cni/networks, mounted over).
pub fn bridge_conflist(
    cni_version: &str,
    network: &str,
    bridge: &str,
    subnet: &str,
    extra: &[&str],
) -> String {
    let mut plugins = vec![
        format!(
            r#"{{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
      "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{subnet}"}}]],
                "routes": [{{"dst": "0.0.0.0/0"}}]}}}}"#
        ),
        r#"{"type": "loopback"}"#.to_owned(),
    ];
    plugins.extend(extra.iter().map(|p| (*p).to_owned()));
    format!(
        "{{\n  \"cniVersion\": \"{cni_version}\",\n  \"name\": \"{network}\",\n  \"plugins\": [\n    {}\n  ]\n}}\n",
        plugins.join(",\n    ")
    )
}
