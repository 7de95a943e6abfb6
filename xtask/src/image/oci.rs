//! The OCI image: one layer holding the binaries under `/usr/local/bin`, assembled with Debian's
//! umoci (layout, manifest, config, digests) from a layer archive GNU tar writes with fixed owners,
//! modes and times, then written as an OCI image-layout tarball the same way.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use xtask::cmd;

use super::{BIN_DIR, ENTRYPOINT_BIN};

/// containerd names an imported image by this index annotation (`ctr image import`; Docker's
/// `docker load` of an OCI archive reads it too); the OCI `ref.name` holds only the tag.
pub const CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

pub const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image name with its tag, e.g. `ghcr.io/ambit-mesh/ambit:latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub name: String,
    pub tag: String,
}

impl Reference {
    /// `name[:tag]`, the tag `latest` if none is given. Digest references name an existing image,
    /// not one being built, so they are refused.
    pub fn parse(s: &str) -> Result<Reference> {
        if s.contains('@') {
            bail!("image reference {s:?}: a digest names an existing image; give name:tag");
        }
        let last_slash = s.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match s[last_slash..].rfind(':') {
            Some(i) => (&s[..last_slash + i], &s[last_slash + i + 1..]),
            None => (s, "latest"),
        };
        let name_ok = !name.is_empty()
            && name.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'.' | b'-' | b'_' | b':')
                    })
            });
        if !name_ok {
            bail!(
                "image reference {s:?}: the name {name:?} must be non-empty path components of \
                 lowercase letters, digits, '.', '-' and '_' (a registry may add :port)"
            );
        }
        let tag_ok = (1..=128).contains(&tag.len())
            && !tag.starts_with(['.', '-'])
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !tag_ok {
            bail!(
                "image reference {s:?}: the tag {tag:?} must be 1 to 128 letters, digits, '.', \
                 '-' and '_', not starting with '.' or '-'"
            );
        }
        Ok(Reference {
            name: name.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

/// The OCI `architecture` (Go's GOARCH names) of a Rust target triple.
pub fn architecture(triple: &str) -> Result<&'static str> {
    match triple.split('-').next() {
        Some("x86_64") => Ok("amd64"),
        Some("aarch64") => Ok("arm64"),
        _ => bail!(
            "target {triple}: the agent's kernel programs and image are built for x86_64 and \
             aarch64 only"
        ),
    }
}

pub struct Image<'a> {
    /// Static executables, copied under [`BIN_DIR`] by file name.
    pub binaries: &'a [PathBuf],
    pub reference: &'a Reference,
    pub architecture: &'a str,
    /// Every timestamp in the image (seconds since 1970).
    pub epoch: u64,
}

#[derive(Debug)]
pub struct Summary {
    pub tarball_bytes: u64,
    /// The compressed layer, as a registry would store it.
    pub layer_bytes: u64,
    pub manifest_digest: String,
}

impl Image<'_> {
    /// Assembles the image under `work` (emptied first) and writes the tarball to `out`.
    pub fn write_tarball(&self, work: &Path, out: &Path) -> Result<Summary> {
        remove_dir_if_present(work)?;
        let rootfs = work.join("rootfs");
        let bin_dir = rootfs.join(BIN_DIR);
        fs::create_dir_all(&bin_dir)
            .with_context(|| format!("failed to create {}", bin_dir.display()))?;
        for binary in self.binaries {
            let name = binary
                .file_name()
                .with_context(|| format!("{} has no file name", binary.display()))?;
            let to = bin_dir.join(name);
            fs::copy(binary, &to).with_context(|| {
                format!("failed to copy {} to {}", binary.display(), to.display())
            })?;
        }
        let layer = work.join("layer.tar");
        let top = BIN_DIR.split('/').next().unwrap_or(BIN_DIR);
        cmd::run(self.tar(&layer, &rootfs).arg(top))?;

        let layout = work.join("layout");
        let image = format!("{}:{}", layout.display(), self.reference.tag);
        umoci(|c| c.args(["init", "--layout"]).arg(&layout))?;
        umoci(|c| c.args(["new", "--image", &image]))?;
        let created =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(self.epoch))
                .to_string();
        let binaries: Vec<String> = self
            .binaries
            .iter()
            .filter_map(|b| b.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        let created_by = format!("cargo xtask image: {} in /{BIN_DIR}", binaries.join(", "));
        umoci(|c| {
            c.args(["raw", "add-layer", "--image", &image])
                .args(["--history.created", &created])
                .args(["--history.created_by", &created_by])
                .arg(&layer)
        })?;
        let entrypoint = format!("/{BIN_DIR}/{ENTRYPOINT_BIN}");
        let path_env = format!("PATH=/{BIN_DIR}");
        umoci(|c| {
            c.args(["config", "--no-history", "--image", &image])
                .args(["--os", "linux", "--architecture", self.architecture])
                .args(["--created", &created])
                .args(["--config.entrypoint", &entrypoint])
                .args(["--config.env", &path_env])
                .args(["--config.workingdir", "/"])
                // The DaemonSet states it too (runAsUser: 0); the image says so for `ctr run`.
                .args(["--config.user", "0:0"])
        })?;
        // `new`, `add-layer` and `config` each leave the blobs they replaced.
        umoci(|c| c.args(["gc", "--layout"]).arg(&layout))?;
        let manifest_digest = name_for_containerd(&layout, self.reference)?;
        let layer_bytes = layer_size(&layout, &manifest_digest)?;

        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
        }
        let partial = out.with_extension("tar.partial");
        cmd::run(
            self.tar(&partial, &layout)
                .args(["oci-layout", "index.json", "blobs"]),
        )?;
        fs::rename(&partial, out).with_context(|| {
            format!("failed to move {} to {}", partial.display(), out.display())
        })?;
        let tarball_bytes = fs::metadata(out)
            .with_context(|| format!("failed to stat {}", out.display()))?
            .len();
        Ok(Summary {
            tarball_bytes,
            layer_bytes,
            manifest_digest,
        })
    }

    /// GNU tar writing `archive` from `dir` with nothing of this machine in it: entries sorted,
    /// owned by 0:0 without names, one mtime, modes 0755/0644 whatever the umask.
    fn tar(&self, archive: &Path, dir: &Path) -> Command {
        let mut tar = Command::new("tar");
        tar.arg("--create")
            .arg("--file")
            .arg(archive)
            .arg("--directory")
            .arg(dir)
            .args([
                "--format=gnu",
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mode=u=rwX,go=rX",
            ])
            .arg(format!("--mtime=@{}", self.epoch));
        tar
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("failed to remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn umoci(args: impl FnOnce(&mut Command) -> &mut Command) -> Result<()> {
    let mut umoci = Command::new("umoci");
    args(&mut umoci);
    cmd::run(&mut umoci).map_err(|e| match which_umoci() {
        true => e,
        false => e.context(
            "umoci not found on PATH: the image is assembled with umoci (Debian: apt-get install umoci)",
        ),
    })
}

fn which_umoci() -> bool {
    Command::new("umoci")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Adds the containerd name annotation to the index's one manifest; returns the manifest's digest.
fn name_for_containerd(layout: &Path, reference: &Reference) -> Result<String> {
    let path = layout.join("index.json");
    let mut index = read_json(&path)?;
    let manifests = index["manifests"]
        .as_array_mut()
        .with_context(|| format!("{}: no manifests array", path.display()))?;
    let [manifest] = manifests.as_mut_slice() else {
        bail!(
            "{}: {} manifests, want the one umoci made",
            path.display(),
            manifests.len()
        );
    };
    let digest = manifest["digest"]
        .as_str()
        .with_context(|| format!("{}: the manifest has no digest", path.display()))?
        .to_owned();
    let annotations = manifest["annotations"]
        .as_object_mut()
        .with_context(|| format!("{}: the manifest has no annotations", path.display()))?;
    if annotations.get(OCI_REF_NAME).and_then(Value::as_str) != Some(&reference.tag) {
        bail!(
            "{}: the manifest's {OCI_REF_NAME} is not {:?}",
            path.display(),
            reference.tag
        );
    }
    annotations.insert(
        CONTAINERD_IMAGE_NAME.to_owned(),
        Value::String(reference.to_string()),
    );
    let text = serde_json::to_vec(&index).context("encoding index.json")?;
    fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(digest)
}

/// The size of the manifest's one layer.
fn layer_size(layout: &Path, manifest_digest: &str) -> Result<u64> {
    let manifest = read_json(&blob_path(layout, manifest_digest)?)?;
    let layers = manifest["layers"]
        .as_array()
        .context("the manifest has no layers array")?;
    match layers.as_slice() {
        [layer] => layer["size"]
            .as_u64()
            .context("the manifest's layer has no size"),
        _ => bail!("the manifest has {} layers, want 1", layers.len()),
    }
}

/// Where a blob lives in an OCI layout (`blobs/<algorithm>/<hex>`).
pub fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (algorithm, hex) = digest
        .split_once(':')
        .with_context(|| format!("digest {digest:?} has no algorithm"))?;
    Ok(layout.join("blobs").join(algorithm).join(hex))
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
}
