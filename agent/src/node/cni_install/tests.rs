use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::json;

use super::*;

/// A conf dir and bin dir of their own, removed on drop.
struct Dirs(PathBuf);

impl Dirs {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "ambit-cni-install-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["net.d", "bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("ambit-cni.src"), b"#!/bin/sh\necho plugin\n").unwrap();
        Dirs(root)
    }

    fn cfg(&self) -> InstallConfig {
        InstallConfig {
            conf_dir: self.0.join("net.d"),
            bin_dir: self.0.join("bin"),
            plugin: self.0.join("ambit-cni.src"),
            run_dir: PathBuf::from("/var/run/ambit"),
            exclude_namespaces: vec!["ambit-system".into()],
        }
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join("net.d").join(name), text).unwrap();
    }

    fn read(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.0.join("net.d").join(name)).unwrap()).unwrap()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.0.join("net.d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn types(config: &Value) -> Vec<&str> {
    config["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect()
}

const CALICO: &str = r#"{"cniVersion": "0.3.1", "name": "k8s-pod-network",
  "plugins": [{"type": "calico", "ipam": {"type": "calico-ipam"}}, {"type": "portmap", "capabilities": {"portMappings": true}}]}"#;

#[test]
fn our_entry_goes_last_once_and_comes_out_again() {
    let path = Path::new("/etc/cni/net.d/10-calico.conflist");
    let config: Value = serde_json::from_str(CALICO).unwrap();
    let entry = json!({"type": "ambit-cni", "runDir": "/var/run/ambit"});
    let once = insert(path, &config, &entry).unwrap();
    assert_eq!(types(&once), vec!["calico", "portmap", "ambit-cni"]);
    assert_eq!(once["name"], "k8s-pod-network");
    assert_eq!(
        once["plugins"][0]["ipam"]["type"], "calico-ipam",
        "kept as it was"
    );
    let twice = insert(path, &once, &entry).unwrap();
    assert_eq!(twice, once, "inserting again changes nothing");
    let newer = json!({"type": "ambit-cni", "runDir": "/run/other"});
    let replaced = insert(path, &once, &newer).unwrap();
    assert_eq!(types(&replaced), vec!["calico", "portmap", "ambit-cni"]);
    assert_eq!(replaced["plugins"][2]["runDir"], "/run/other");
    assert_eq!(remove(path, &once).unwrap(), Some(config.clone()));
    assert_eq!(remove(path, &config).unwrap(), None, "nothing of ours");
}

#[test]
fn a_single_network_becomes_a_list_holding_it() {
    let path = Path::new("/etc/cni/net.d/10-bridge.conf");
    let single = json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge",
                        "bridge": "cni0", "ipam": {"type": "host-local"}});
    let list = insert(path, &single, &json!({"type": "ambit-cni"})).unwrap();
    assert_eq!(
        list,
        json!({"cniVersion": "0.4.0", "name": "bridge-net", "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
            {"type": "ambit-cni"}
        ]})
    );
}

#[test]
fn bad_configs_are_named_with_their_file_and_field() {
    let d = Dirs::new();
    d.write("05-broken.conflist", "{\"plugins\": [");
    let e = read_config(&d.cfg().conf_dir.join("05-broken.conflist")).unwrap_err();
    assert!(
        matches!(&e, InstallError::BadJson { path, .. } if path.ends_with("05-broken.conflist")),
        "{e}"
    );
    assert!(e.to_string().contains("05-broken.conflist"), "{e}");
    let path = Path::new("/x/10-a.conflist");
    let e = insert(
        path,
        &json!({"plugins": [{"type": "a"}, {"name": "no type"}]}),
        &json!({}),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("10-a.conflist") && e.to_string().contains("plugins[1].type"),
        "{e}"
    );
    let e = insert(path, &json!({"plugins": "x"}), &json!({})).unwrap_err();
    assert!(e.to_string().contains("field plugins"), "{e}");
    let e = insert(path, &json!([1]), &json!({})).unwrap_err();
    assert!(e.to_string().contains("not an object"), "{e}");
}

#[test]
fn the_primary_config_is_the_first_that_loads() {
    let d = Dirs::new();
    assert!(primary_file(&d.cfg().conf_dir).unwrap().is_none());
    d.write("20-other.conflist", CALICO);
    d.write("10-calico.conflist", CALICO);
    // Before both by name, but not loadable: the runtime skips it, so do we.
    d.write("05-broken.conflist", "{");
    d.write("01-notes.txt", "not a config");
    assert_eq!(
        primary_file(&d.cfg().conf_dir).unwrap(),
        Some(d.cfg().conf_dir.join("10-calico.conflist"))
    );
}

#[test]
fn install_converts_a_conf_keeps_files_valid_and_uninstall_restores() {
    let d = Dirs::new();
    let cfg = d.cfg();
    assert!(matches!(
        install_once(&cfg),
        Err(InstallError::NoPrimary { .. })
    ));
    d.write(
        "10-bridge.conf",
        r#"{"cniVersion": "1.0.0", "name": "net", "type": "bridge", "bridge": "cni0"}"#,
    );
    let written = install_once(&cfg).unwrap();
    assert_eq!(written, Some(cfg.conf_dir.join("10-bridge.conflist")));
    assert_eq!(d.names(), vec!["10-bridge.conflist".to_string()]);
    assert_eq!(
        types(&d.read("10-bridge.conflist")),
        vec!["bridge", "ambit-cni"]
    );
    assert_eq!(
        std::fs::read(cfg.bin_dir.join(PLUGIN_TYPE)).unwrap(),
        std::fs::read(&cfg.plugin).unwrap(),
        "binary installed"
    );
    assert_eq!(
        install_once(&cfg).unwrap(),
        None,
        "nothing to do the second time"
    );

    // The primary CNI rewrites its list without us: we go back in.
    d.write("10-bridge.conflist", CALICO);
    assert!(install_once(&cfg).unwrap().is_some());
    assert_eq!(
        types(&d.read("10-bridge.conflist")),
        vec!["calico", "portmap", "ambit-cni"]
    );

    uninstall(&cfg).unwrap();
    assert_eq!(
        types(&d.read("10-bridge.conflist")),
        vec!["calico", "portmap"]
    );
    assert!(!cfg.bin_dir.join(PLUGIN_TYPE).exists(), "binary removed");
    assert_eq!(
        d.names(),
        vec!["10-bridge.conflist".to_string()],
        "no temp file left"
    );
}

/// A symlink planted at the temp file's name is replaced, never written through, and the binary
/// is executable whatever the umask.
#[test]
fn temp_files_never_follow_a_symlink_and_the_binary_is_executable() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = Dirs::new();
    let cfg = d.cfg();
    let victim = d.0.join("victim");
    std::fs::write(&victim, b"untouched").unwrap();
    let to = cfg.bin_dir.join(PLUGIN_TYPE);
    std::os::unix::fs::symlink(&victim, temp_name(&to, PLUGIN_TYPE)).unwrap();
    assert!(install_binary(&cfg).unwrap());
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
    assert_eq!(
        std::fs::read(&to).unwrap(),
        std::fs::read(&cfg.plugin).unwrap()
    );
    let meta = std::fs::symlink_metadata(&to).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert!(!temp_name(&to, PLUGIN_TYPE).exists());
}
