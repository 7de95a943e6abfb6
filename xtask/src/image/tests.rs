use std::{fs, path::PathBuf, process::Command};

use serde_json::json;

use super::oci::{self, Reference};
use super::*;

/// Debian's busybox-static: a static executable every test machine has (`DEBIAN_TOOLS`).
const STATIC_BUSYBOX: &str = "/bin/busybox";

fn scratch(name: &str) -> PathBuf {
    let dir = xtask::target_dir()
        .join("xtask-image-test")
        .join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

#[test]
fn host_triple_is_rustcs_host_line() {
    let vv = "rustc 1.95.0 (abc 2026-01-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.95.0\n";
    assert_eq!(triple_of(vv).unwrap(), "x86_64-unknown-linux-gnu");
    assert!(triple_of("rustc 1.95.0\n").is_err());
}

#[test]
fn every_binary_of_the_workspace_but_xtasks_goes_in() {
    let metadata = json!({"packages": [
        {"name": "xtask", "targets": [{"name": "xtask", "kind": ["bin"]}]},
        {"name": "ambit-ebpf", "targets": [{"name": "ambit-ebpf", "kind": ["bin"]}]},
        {"name": "ambit-agent", "targets": [
            {"name": "ambit", "kind": ["lib"]},
            {"name": "ambit", "kind": ["bin"]},
            {"name": "capture", "kind": ["test"]},
            {"name": "ambit-cni", "kind": ["bin"]},
        ]},
        {"name": "ambit-common", "targets": [{"name": "ambit_common", "kind": ["lib"]}]},
    ]});
    let bins = bins_of(&metadata).unwrap();
    let names: Vec<(&str, &str)> = bins
        .iter()
        .map(|b| (b.package.as_str(), b.name.as_str()))
        .collect();
    assert_eq!(
        names,
        [("ambit-agent", "ambit"), ("ambit-agent", "ambit-cni")]
    );
    assert!(bins_of(&json!({})).is_err());
}

#[test]
fn bin_selects_by_name_and_names_what_exists() {
    let bin = |package: &str, name: &str| BinTarget {
        package: package.into(),
        name: name.into(),
    };
    let found = vec![bin("ambit-agent", "ambit"), bin("ambit-cni", "ambit-cni")];
    assert_eq!(select(found.clone(), &[]).unwrap(), found);
    assert_eq!(
        select(found.clone(), &["ambit-cni".into(), "ambit-cni".into()]).unwrap(),
        [bin("ambit-cni", "ambit-cni")]
    );
    let err = select(found.clone(), &["ztunnel".into()]).unwrap_err();
    assert!(
        err.to_string().contains("have: ambit, ambit-cni"),
        "{err:#}"
    );
    let twice = vec![bin("a", "ambit"), bin("b", "ambit")];
    let err = select(twice, &["ambit".into()]).unwrap_err();
    assert!(err.to_string().contains("packages a and b"), "{err:#}");
    assert!(select(Vec::new(), &[]).is_err());
}

#[test]
fn references_keep_registry_ports_and_default_to_latest() {
    let parse = |s: &str| Reference::parse(s).map(|r| (r.name, r.tag));
    let ok = |name: &str, tag: &str| Some((name.to_owned(), tag.to_owned()));
    assert_eq!(
        parse("ghcr.io/ambit-mesh/ambit:latest").ok(),
        ok("ghcr.io/ambit-mesh/ambit", "latest")
    );
    assert_eq!(
        parse("localhost:5000/ambit").ok(),
        ok("localhost:5000/ambit", "latest")
    );
    assert_eq!(parse("ambit:v0.1.0").ok(), ok("ambit", "v0.1.0"));
    for bad in [
        "Ambit:x",
        "ambit:",
        "ambit@sha256:0123",
        ":tag",
        "a//b:c",
        "ambit:-x",
    ] {
        assert!(parse(bad).is_err(), "{bad} accepted");
    }
    assert_eq!(
        Reference::parse("ambit").unwrap().to_string(),
        "ambit:latest"
    );
}

#[test]
fn architectures_are_ocis_names() {
    assert_eq!(
        oci::architecture("x86_64-unknown-linux-gnu").unwrap(),
        "amd64"
    );
    assert_eq!(
        oci::architecture("aarch64-unknown-linux-musl").unwrap(),
        "arm64"
    );
    assert!(oci::architecture("riscv64gc-unknown-linux-gnu").is_err());
}

#[test]
fn a_dynamic_binary_is_refused_and_a_static_one_passes() {
    // This test binary is an ordinary (dynamic) Rust executable.
    let me = std::env::current_exe().unwrap();
    let linkage = elf::linkage(&fs::read(&me).unwrap()).unwrap();
    assert!(linkage.interpreter.is_some(), "{linkage:?}");
    assert!(linkage.needed > 0, "{linkage:?}");
    let err = elf::check_static(&me).unwrap_err();
    assert!(err.to_string().contains("program interpreter"), "{err:#}");

    let busybox = fs::read(STATIC_BUSYBOX)
        .unwrap_or_else(|e| panic!("{STATIC_BUSYBOX} (Debian's busybox-static): {e}"));
    assert_eq!(elf::linkage(&busybox).unwrap(), elf::Linkage::default());
    elf::check_static(STATIC_BUSYBOX.as_ref()).unwrap();

    let dir = scratch("elf");
    let text = dir.join("script");
    fs::write(&text, "#!/bin/sh\n").unwrap();
    let err = elf::check_static(&text).unwrap_err();
    assert!(err.to_string().contains("not a 64-bit ELF"), "{err:#}");
    fs::remove_dir_all(&dir).unwrap();
}

fn run_ok(cmd: &mut Command) -> String {
    xtask::cmd::output(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn the_image_is_the_binaries_alone_and_reproducible() {
    let dir = scratch("oci");
    let bin_dir = dir.join("bins");
    fs::create_dir_all(&bin_dir).unwrap();
    let binaries = ["ambit", "ambit-cni"].map(|name| {
        let path = bin_dir.join(name);
        fs::copy(STATIC_BUSYBOX, &path)
            .unwrap_or_else(|e| panic!("{STATIC_BUSYBOX} (Debian's busybox-static): {e}"));
        path
    });
    let reference = Reference::parse("example.test/ambit:t1").unwrap();
    let image = |epoch| oci::Image {
        binaries: &binaries,
        reference: &reference,
        architecture: "amd64",
        epoch,
    };
    let first = dir.join("first.tar");
    let summary = image(1_700_000_000)
        .write_tarball(&dir.join("work"), &first)
        .unwrap();
    let second = dir.join("second.tar");
    image(1_700_000_000)
        .write_tarball(&dir.join("work"), &second)
        .unwrap();
    assert!(
        fs::read(&first).unwrap() == fs::read(&second).unwrap(),
        "two builds of the same binaries differ"
    );
    let later = dir.join("later.tar");
    image(1_700_000_001)
        .write_tarball(&dir.join("work"), &later)
        .unwrap();
    assert!(fs::read(&first).unwrap() != fs::read(&later).unwrap());

    // What `ctr image import` reads: the layout, the index's names, the manifest's one layer.
    let layout = dir.join("layout");
    fs::create_dir_all(&layout).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&first)
            .arg("-C")
            .arg(&layout),
    );
    let index = oci::read_json(&layout.join("index.json")).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(
        manifests[0]["annotations"][oci::CONTAINERD_IMAGE_NAME],
        "example.test/ambit:t1"
    );
    assert_eq!(manifests[0]["annotations"][oci::OCI_REF_NAME], "t1");
    let digest = manifests[0]["digest"].as_str().unwrap();
    assert_eq!(digest, summary.manifest_digest);
    let manifest = oci::read_json(&oci::blob_path(&layout, digest).unwrap()).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = oci::read_json(&oci::blob_path(&layout, config_digest).unwrap()).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    assert_eq!(
        config["config"]["Entrypoint"],
        json!(["/usr/local/bin/ambit"])
    );
    assert_eq!(config["config"]["User"], "0:0");
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "one entry for the one layer: {config}");
    assert_eq!(history[0]["created"], "2023-11-14T22:13:20Z");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "no base image: {manifest}");
    assert_eq!(layers[0]["size"].as_u64(), Some(summary.layer_bytes));
    let layer = oci::blob_path(&layout, layers[0]["digest"].as_str().unwrap()).unwrap();
    let listing = run_ok(
        Command::new("tar")
            .args(["--list", "--verbose", "--numeric-owner", "--gzip", "--file"])
            .arg(&layer)
            .env("TZ", "UTC"),
    );
    let entries: Vec<(&str, &str, &str)> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0], f[1], *f.last().unwrap())
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("drwxr-xr-x", "0/0", "usr/"),
            ("drwxr-xr-x", "0/0", "usr/local/"),
            ("drwxr-xr-x", "0/0", "usr/local/bin/"),
            ("-rwxr-xr-x", "0/0", "usr/local/bin/ambit"),
            ("-rwxr-xr-x", "0/0", "usr/local/bin/ambit-cni"),
        ],
        "{listing}"
    );
    assert!(
        listing.lines().all(|l| l.contains("2023-11-14 22:13")),
        "every mtime is the epoch's: {listing}"
    );
    fs::remove_dir_all(&dir).unwrap();
}
