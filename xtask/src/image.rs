//! `cargo xtask image`: the agent's container image. Builds every binary target of the workspace
//! (or the ones asked for) fully static for the host's target, checks that each has no program
//! interpreter and no shared-library dependency, and assembles an OCI image of those binaries alone
//! (no base image: the agent executes no other program) with umoci, written as an OCI image-layout
//! tarball that `ctr image import`, `skopeo copy oci-archive:` and `docker load` take.
//!
//! The image is reproducible: every file and timestamp comes from the binaries and one fixed time
//! (`SOURCE_DATE_EPOCH`, else the time of the last commit), so the same binaries give the same bytes.

mod elf;
mod oci;

use std::{
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use xtask::{cmd, ebpf, workspace_root};

/// The name the DaemonSet (deploy/daemonset.yaml) runs; an overlay's `images:` entry renames it.
pub const DEFAULT_REFERENCE: &str = "ghcr.io/ambit-mesh/ambit:latest";

/// Where the binaries sit in the image. The entrypoint is the agent; other binaries (the CNI
/// plugin) are there for the DaemonSet to run or copy onto the node.
pub const BIN_DIR: &str = "usr/local/bin";

/// The binary the image runs.
pub const ENTRYPOINT_BIN: &str = "ambit";

/// Workspace packages whose binaries never go into the image: the task runner and the kernel
/// programs (the agent embeds their object).
const NOT_IMAGE_PACKAGES: [&str; 2] = ["xtask", ebpf::PACKAGE];

/// Static linking for the target only (cargo applies `CARGO_ENCODED_RUSTFLAGS` to build scripts
/// and proc macros too unless `--target` is given, and they must stay dynamic). No debug info and
/// no symbol table in the image: the release profile's line tables serve local profiling.
const STATIC_RUSTFLAGS: [&str; 6] = [
    "-C",
    "target-feature=+crt-static",
    "-C",
    "debuginfo=0",
    "-C",
    "strip=symbols",
];

pub struct Options {
    /// Binary targets to build and put in the image; empty = every one the workspace has.
    pub bins: Vec<String>,
    /// The image tarball [default: target/image/ambit-image.tar].
    pub out: Option<PathBuf>,
    /// The image's name, as `ctr image import` records it.
    pub reference: String,
    /// Copy the static binaries here and build no image (the Dockerfile's build stage).
    pub binaries_only: Option<PathBuf>,
    /// The cargo profile to build with (`release` for the shipped image).
    pub profile: String,
}

/// A binary target of a workspace package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinTarget {
    pub package: String,
    pub name: String,
}

pub fn run(opts: Options) -> Result<()> {
    let reference = oci::Reference::parse(&opts.reference)?;
    let triple = host_triple()?;
    let arch = oci::architecture(&triple)?;
    let bins = select(workspace_bins()?, &opts.bins)?;
    if !bins.iter().any(|b| b.name == ENTRYPOINT_BIN) && opts.binaries_only.is_none() {
        bail!(
            "the image's entrypoint is `{ENTRYPOINT_BIN}`, which --bin does not name (asked for: {})",
            opts.bins.join(", ")
        );
    }
    let built = build_static(&bins, &triple, &opts.profile)?;
    for path in &built {
        elf::check_static(path)?;
    }
    say(format_args!(
        "{} static, no interpreter and no shared library: {}",
        plural(built.len(), "binary", "binaries"),
        names(&built)
    ));
    if let Some(dir) = opts.binaries_only {
        fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        for path in &built {
            let to = dir.join(file_name(path)?);
            fs::copy(path, &to).with_context(|| {
                format!("failed to copy {} to {}", path.display(), to.display())
            })?;
        }
        say(format_args!("copied to {}", dir.display()));
        return Ok(());
    }
    let out = opts.out.unwrap_or_else(default_out);
    let epoch = source_date_epoch()?;
    let work = xtask::target_dir().join("image").join("work");
    let image = oci::Image {
        binaries: &built,
        reference: &reference,
        architecture: arch,
        epoch,
    };
    let summary = image.write_tarball(&work, &out)?;
    say(format_args!(
        "{} ({}): {} ({} MiB; layer {} MiB gzip), manifest {}",
        reference,
        arch,
        out.display(),
        mib(summary.tarball_bytes),
        mib(summary.layer_bytes),
        summary.manifest_digest
    ));
    say(format_args!(
        "import: ctr -n k8s.io image import {}",
        out.display()
    ));
    Ok(())
}

/// The default tarball.
pub fn default_out() -> PathBuf {
    xtask::target_dir().join("image").join("ambit-image.tar")
}

fn say(msg: std::fmt::Arguments<'_>) {
    eprintln!("[xtask] image: {msg}");
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `name (size MiB)` of each binary.
fn names(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            match fs::metadata(p) {
                Ok(meta) => format!("{name} ({} MiB)", mib(meta.len())),
                Err(_) => name.into_owned(),
            }
        })
        .collect();
    names.join(", ")
}

fn file_name(path: &Path) -> Result<&std::ffi::OsStr> {
    path.file_name()
        .with_context(|| format!("{} has no file name", path.display()))
}

/// The host's target triple, as rustc states it (`host:` of `rustc -vV`).
fn host_triple() -> Result<String> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = cmd::output(Command::new(rustc).arg("-vV"))?;
    triple_of(&version)
}

fn triple_of(rustc_vv: &str) -> Result<String> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|t| t.trim().to_owned())
        .context("`rustc -vV` printed no `host:` line")
}

/// Every binary target of the workspace's packages, except [`NOT_IMAGE_PACKAGES`].
fn workspace_bins() -> Result<Vec<BinTarget>> {
    let metadata = cmd::output(
        cargo()
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(workspace_root()),
    )?;
    let metadata: Value =
        serde_json::from_str(&metadata).context("`cargo metadata` printed no JSON")?;
    bins_of(&metadata)
}

fn bins_of(metadata: &Value) -> Result<Vec<BinTarget>> {
    let packages = metadata["packages"]
        .as_array()
        .context("`cargo metadata`: no `packages` array")?;
    let mut bins = Vec::new();
    for package in packages {
        let name = package["name"]
            .as_str()
            .context("`cargo metadata`: a package without a name")?;
        if NOT_IMAGE_PACKAGES.contains(&name) {
            continue;
        }
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_bin = target["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"));
            if let (true, Some(bin)) = (is_bin, target["name"].as_str()) {
                bins.push(BinTarget {
                    package: name.to_owned(),
                    name: bin.to_owned(),
                });
            }
        }
    }
    bins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(bins)
}

/// The binaries `asked` names (all of `found` if none), each found exactly once.
fn select(found: Vec<BinTarget>, asked: &[String]) -> Result<Vec<BinTarget>> {
    if found.is_empty() {
        bail!("the workspace has no binary target for the image");
    }
    if asked.is_empty() {
        return Ok(found);
    }
    let mut chosen = Vec::new();
    for name in asked {
        let mut matching = found.iter().filter(|b| &b.name == name);
        let Some(bin) = matching.next() else {
            let known: Vec<&str> = found.iter().map(|b| b.name.as_str()).collect();
            bail!(
                "--bin {name}: no such binary target in the workspace (have: {})",
                known.join(", ")
            );
        };
        if let Some(other) = matching.next() {
            bail!(
                "--bin {name}: packages {} and {} both have a binary of that name",
                bin.package,
                other.package
            );
        }
        if !chosen.contains(bin) {
            chosen.push(bin.clone());
        }
    }
    Ok(chosen)
}

/// The cargo build that `cargo xtask image --profile <profile>` runs for the whole image (every
/// binary), for `cargo xtask test` to start early: the image test then finds it built.
pub fn prebuild_command(profile: &str) -> Result<Command> {
    let bins = select(workspace_bins()?, &[])?;
    Ok(build_command(&bins, &host_triple()?, profile))
}

/// `cargo build` of `bins`, static, with `profile`.
fn build_command(bins: &[BinTarget], triple: &str, profile: &str) -> Command {
    let mut build = cargo();
    build
        .current_dir(workspace_root())
        .args(["build", "--profile", profile, "--target", triple]);
    let mut packages: Vec<&str> = bins.iter().map(|b| b.package.as_str()).collect();
    packages.sort_unstable();
    packages.dedup();
    for package in packages {
        build.args(["--package", package]);
    }
    for bin in bins {
        build.args(["--bin", &bin.name]);
    }
    build.env("CARGO_ENCODED_RUSTFLAGS", STATIC_RUSTFLAGS.join("\x1f"));
    build
}

/// Builds `bins` statically with `profile` and returns their paths.
fn build_static(bins: &[BinTarget], triple: &str, profile: &str) -> Result<Vec<PathBuf>> {
    cmd::run(&mut build_command(bins, triple, profile))?;
    let dir = xtask::target_dir().join(triple).join(profile_dir(profile));
    bins.iter()
        .map(|bin| {
            let path = dir.join(&bin.name);
            let meta = fs::metadata(&path).with_context(|| {
                format!("cargo built no {} (expected {})", bin.name, path.display())
            })?;
            if meta.permissions().mode() & 0o111 == 0 {
                bail!("{} is not executable", path.display());
            }
            Ok(path)
        })
        .collect()
}

/// The directory under `target/<triple>/` that cargo writes a profile's output to: `debug` for
/// `dev` and `test`, `release` for `bench`, and its own name for any other profile.
fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

/// The cargo that runs us, without what cargo set for the xtask run.
fn cargo() -> Command {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    cmd::nested_cargo(&cargo)
}

/// The image's one timestamp: `SOURCE_DATE_EPOCH` (the reproducible-builds convention), else the
/// last commit's time, else the Unix epoch (a source tree without git).
fn source_date_epoch() -> Result<u64> {
    if let Ok(value) = env::var("SOURCE_DATE_EPOCH") {
        return value.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH {value:?}: want whole seconds since 1970")
        });
    }
    let git = Command::new("git")
        .arg("-C")
        .arg(workspace_root())
        .args(["log", "-1", "--format=%ct"])
        .output();
    match git {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            text.trim()
                .parse()
                .with_context(|| format!("`git log -1 --format=%ct` printed {text:?}"))
        }
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests;
