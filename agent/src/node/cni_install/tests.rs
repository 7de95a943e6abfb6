use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::inotify::{AddWatchFlags, InotifyEvent};
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
            uninstalled: Default::default(),
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

/// What one pass of [`watch_reporting`] did, and when it returned.
#[derive(Debug, PartialEq)]
enum Pass {
    Wrote(PathBuf),
    Unchanged,
    Failed(String),
}

/// A running [`watch`] whose passes the test reads in order; stopped on drop.
struct Watching {
    passes: tokio::sync::mpsc::UnboundedReceiver<(Pass, std::time::Instant)>,
    task: tokio::task::JoinHandle<()>,
}

impl Watching {
    fn start(cfg: InstallConfig, poll: Duration) -> Self {
        let (tx, passes) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(watch_reporting(
            cfg,
            poll,
            || true,
            move |outcome| {
                let pass = match outcome {
                    Ok(Some(file)) => Pass::Wrote(file.clone()),
                    Ok(None) => Pass::Unchanged,
                    Err(e) => Pass::Failed(e.to_string()),
                };
                let _ = tx.send((pass, std::time::Instant::now()));
            },
        ));
        Watching { passes, task }
    }

    /// The next pass, waiting at most [`PATIENCE`].
    async fn next(&mut self, why: &str) -> (Pass, std::time::Instant) {
        match tokio::time::timeout(PATIENCE, self.passes.recv()).await {
            Ok(Some(pass)) => pass,
            Ok(None) => panic!("the watch stopped while waiting for {why}"),
            Err(_) => panic!("no pass within {PATIENCE:?} while waiting for {why}"),
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a test waits for what an event must bring: far below the tests' 1-hour poll, far
/// above an event's latency on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// A poll that never comes within a test: what happens comes from the events.
const NO_POLL: Duration = Duration::from_secs(3600);

/// Waits (bounded by [`PATIENCE`]) until `path` is a list ending with our entry.
async fn wait_for_entry(path: &Path, why: &str) {
    let has_entry = || {
        std::fs::read(path)
            .ok()
            .and_then(|text| serde_json::from_slice::<Value>(&text).ok())
            .and_then(|v| v["plugins"].as_array()?.last().cloned())
            .is_some_and(|p| is_ours(&p))
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !has_entry() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{why}: ambit-cni not at the end of {} within {PATIENCE:?} (with a {NO_POLL:?} poll, \
             only a file event brings it)",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the conf dir holds exactly `want`.
async fn wait_for_names(d: &Dirs, want: &[&str], why: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let names = d.names();
        if names == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{why}: the conf dir holds {names:?}, not {want:?}, after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Replaces `name` the way a primary CNI does: a temp file renamed over it, without our entry.
fn rewrite_as_primary(d: &Dirs, name: &str, text: &str) {
    let dir = d.cfg().conf_dir;
    let tmp = dir.join(format!(".{name}.primary-tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test]
async fn the_entry_is_back_on_the_primarys_rename_not_on_the_next_poll() {
    let d = Dirs::new();
    let cfg = d.cfg();
    let file = cfg.conf_dir.join("10-calico.conflist");
    d.write("10-calico.conflist", CALICO);
    let mut watching = Watching::start(cfg, NO_POLL);
    wait_for_entry(&file, "the first pass").await;
    assert_eq!(
        watching.next("the first pass").await.0,
        Pass::Wrote(file.clone())
    );
    for round in 1..=3 {
        rewrite_as_primary(&d, "10-calico.conflist", CALICO);
        wait_for_entry(&file, &format!("rewrite {round} by the primary")).await;
        let mut pass = watching.next("the pass after the rewrite").await.0;
        if round == 1 && pass == Pass::Unchanged {
            // The event of the first pass's own write, if it was not read with the rewrite's.
            pass = watching.next("the pass after the rewrite").await.0;
        }
        assert_eq!(pass, Pass::Wrote(file.clone()), "rewrite {round}");
        // Our write is an event too: one pass that finds nothing to do, and no more (the next
        // round's first pass is a write again).
        assert_eq!(
            watching.next("the pass after our own write").await.0,
            Pass::Unchanged,
            "rewrite {round}"
        );
        assert_eq!(
            types(&d.read("10-calico.conflist")),
            vec!["calico", "portmap", "ambit-cni"]
        );
    }
    assert_eq!(d.names(), vec!["10-calico.conflist".to_string()]);
}

#[tokio::test]
async fn a_primary_written_later_is_picked_up_from_its_event_and_a_conf_becomes_a_list() {
    let d = Dirs::new();
    let cfg = d.cfg();
    let mut watching = Watching::start(cfg.clone(), NO_POLL);
    // The first pass runs once the watch is armed: what is written from now on is an event.
    match watching.next("the first pass").await.0 {
        Pass::Failed(e) => assert!(e.contains("no CNI network config"), "{e}"),
        other => panic!("first pass in an empty dir: {other:?}"),
    }
    // Written in place, not renamed: the runtime's own rule (close after write) picks it up.
    d.write(
        "10-bridge.conf",
        r#"{"cniVersion": "1.0.0", "name": "net", "type": "bridge", "bridge": "cni0"}"#,
    );
    let list = cfg.conf_dir.join("10-bridge.conflist");
    wait_for_entry(&list, "a new .conf").await;
    assert_eq!(
        types(&d.read("10-bridge.conflist")),
        vec!["bridge", "ambit-cni"]
    );
    // The .conf goes once its list is in place: waited for, not assumed.
    wait_for_names(
        &d,
        &["10-bridge.conflist"],
        "the .conf replaced by its list",
    )
    .await;
}

#[tokio::test]
async fn a_conf_dir_missing_at_start_is_polled_until_it_exists() {
    let d = Dirs::new();
    let cfg = d.cfg();
    std::fs::remove_dir(&cfg.conf_dir).unwrap();
    let mut watching = Watching::start(cfg.clone(), Duration::from_millis(20));
    match watching.next("the first pass").await.0 {
        Pass::Failed(e) => assert!(e.contains("CNI conf dir"), "{e}"),
        other => panic!("first pass without a conf dir: {other:?}"),
    }
    std::fs::create_dir(&cfg.conf_dir).unwrap();
    d.write("10-calico.conflist", CALICO);
    wait_for_entry(&cfg.conf_dir.join("10-calico.conflist"), "a dir made later").await;
}

/// How long after the primary's rename our entry is back. Not a test (nothing to assert on
/// a time); run with
/// `cargo test -p ambit-agent --lib cni_install::tests::reinsert_latency -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement"]
async fn reinsert_latency() {
    let d = Dirs::new();
    let cfg = d.cfg();
    let file = cfg.conf_dir.join("10-calico.conflist");
    d.write("10-calico.conflist", CALICO);
    let mut watching = Watching::start(cfg, NO_POLL);
    assert_eq!(
        watching.next("the first pass").await.0,
        Pass::Wrote(file.clone())
    );
    assert_eq!(watching.next("our own write").await.0, Pass::Unchanged);
    let mut took = Vec::new();
    for _ in 0..100 {
        let tmp = file.with_file_name(".10-calico.conflist.primary-tmp");
        std::fs::write(&tmp, CALICO).unwrap();
        let renamed = std::time::Instant::now();
        std::fs::rename(&tmp, &file).unwrap();
        let (pass, at) = watching.next("the rewrite").await;
        assert_eq!(pass, Pass::Wrote(file.clone()));
        took.push(at - renamed);
        assert_eq!(watching.next("our own write").await.0, Pass::Unchanged);
    }
    took.sort();
    println!(
        "entry back after the primary's rename, {} rewrites: p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() * 99 / 100],
        took[took.len() - 1]
    );
}

/// Which events call for a pass, and the watch following the dir's path when the dir moves.
#[tokio::test]
async fn config_names_overflow_and_the_dir_moving_call_for_a_pass() {
    let d = Dirs::new();
    let dir = d.cfg().conf_dir;
    let bin_dir = d.cfg().bin_dir;
    let mut events = DirEvents::new(&dir, &bin_dir).unwrap();
    let wd = events.wd.expect("armed on an existing dir");
    let event = |mask: AddWatchFlags, name: Option<&str>| InotifyEvent {
        wd,
        mask,
        cookie: 0,
        name: name.map(Into::into),
    };
    for name in ["10-calico.conflist", "10-bridge.conf", "99-x.json"] {
        assert!(
            events.handle(&event(AddWatchFlags::IN_MOVED_TO, Some(name))),
            "{name}"
        );
    }
    let ours = temp_name(&dir.join("10-calico.conflist"), "10-calico.conflist");
    let ours = ours.file_name().unwrap().to_str().unwrap();
    for name in [ours, "notes.txt", "10-calico.conflist.tmp"] {
        assert!(
            !events.handle(&event(AddWatchFlags::IN_CLOSE_WRITE, Some(name))),
            "{name}"
        );
    }
    // In the bin dir, only our binary counts.
    let bin_wd = events.bin_wd.expect("armed on the bin dir");
    let in_bin = |mask: AddWatchFlags, name: &str| InotifyEvent {
        wd: bin_wd,
        mask,
        cookie: 0,
        name: Some(name.into()),
    };
    assert!(events.handle(&in_bin(AddWatchFlags::IN_DELETE, PLUGIN_TYPE)));
    assert!(!events.handle(&in_bin(AddWatchFlags::IN_DELETE, "bridge")));
    assert!(!events.handle(&in_bin(AddWatchFlags::IN_MOVED_TO, "10-calico.conflist")));
    assert!(
        events.handle(&event(AddWatchFlags::IN_Q_OVERFLOW, None)),
        "lost events: a full pass"
    );
    assert_eq!(events.wd, Some(wd));

    // The dir moves away and another takes its path: the watch goes to the new one.
    std::fs::rename(&dir, d.0.join("net.d.old")).unwrap();
    std::fs::create_dir(&dir).unwrap();
    assert!(events.handle(&event(AddWatchFlags::IN_MOVE_SELF, None)));
    assert_eq!(events.wd, None, "the moved dir is not watched any more");
    assert!(
        !events.handle(&event(AddWatchFlags::IN_CLOSE_WRITE, Some("10-a.conflist"))),
        "an event of the dropped watch"
    );
    events.arm();
    assert!(events.wd.is_some_and(|new| new != wd));
    std::fs::write(dir.join("10-a.conflist"), CALICO).unwrap();
    tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("an event from the dir now at the path")
        .unwrap();
}

#[test]
fn a_primary_write_between_our_read_and_our_rename_is_never_overwritten() {
    let d = Dirs::new();
    let cfg = d.cfg();
    let v1 = r#"{"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "calico", "v": 1}]}"#;
    let v2 = r#"{"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "calico", "v": 2}]}"#;
    d.write("10-calico.conflist", v1);
    let file = cfg.conf_dir.join("10-calico.conflist");
    let plan = Plan::make(&cfg, &file, Takeover::Yes)
        .unwrap()
        .expect("our entry is missing");
    // The primary renames its new version over the file while our pass runs.
    rewrite_as_primary(&d, "10-calico.conflist", v2);
    assert_eq!(plan.commit().unwrap(), None, "the pass starts over");
    let now = d.read("10-calico.conflist");
    assert_eq!(
        now["plugins"][0]["v"], 2,
        "the primary's version stays: {now}"
    );
    assert_eq!(
        d.names(),
        vec!["10-calico.conflist".to_string()],
        "no temp file left"
    );
    // The next pass adds us to the new version.
    install_once(&cfg).unwrap();
    let now = d.read("10-calico.conflist");
    assert_eq!(types(&now), vec!["calico", PLUGIN_TYPE]);
    assert_eq!(now["plugins"][0]["v"], 2);

    // The same for an in-place write of the same size (timestamps may not move), and for a `.conf`
    // being converted: the primary's new `.conf` stays and our list goes.
    let d = Dirs::new();
    let cfg = d.cfg();
    let c1 = r#"{"cniVersion": "1.0.0", "name": "net", "type": "bridge", "mtu": 1400}"#;
    let c2 = r#"{"cniVersion": "1.0.0", "name": "net", "type": "bridge", "mtu": 1500}"#;
    d.write("10-bridge.conf", c1);
    let file = cfg.conf_dir.join("10-bridge.conf");
    let plan = Plan::make(&cfg, &file, Takeover::Yes)
        .unwrap()
        .expect("a conversion");
    d.write("10-bridge.conf", c2);
    assert_eq!(plan.commit().unwrap(), None);
    assert_eq!(d.names(), vec!["10-bridge.conf".to_string()]);
    assert_eq!(d.read("10-bridge.conf")["mtu"], 1500);
    install_once(&cfg).unwrap();
    let list = d.read("10-bridge.conflist");
    assert_eq!(types(&list), vec!["bridge", PLUGIN_TYPE]);
    assert_eq!(list["plugins"][0]["mtu"], 1500);
}

#[test]
fn a_json_network_the_primary_writes_again_replaces_our_list_made_from_it() {
    let d = Dirs::new();
    let cfg = d.cfg();
    let j1 = r#"{"cniVersion": "1.0.0", "name": "net", "type": "bridge", "mtu": 1400}"#;
    let j2 = r#"{"cniVersion": "1.0.0", "name": "net", "type": "bridge", "mtu": 1500}"#;
    d.write("10-net.json", j1);
    install_once(&cfg).unwrap();
    assert_eq!(d.names(), vec!["10-net.conflist".to_string()]);
    // `10-net.conflist` sorts before `10-net.json`: without the rule, the runtime would keep
    // using our list of the old network.
    d.write("10-net.json", j2);
    let wrote = install_once(&cfg).unwrap();
    assert_eq!(wrote, Some(cfg.conf_dir.join("10-net.conflist")));
    assert_eq!(d.names(), vec!["10-net.conflist".to_string()]);
    let list = d.read("10-net.conflist");
    assert_eq!(types(&list), vec!["bridge", PLUGIN_TYPE]);
    assert_eq!(list["plugins"][0]["mtu"], 1500);
    // A list of the primary's own beside an unrelated `.json` list: not ours, left alone.
    let d = Dirs::new();
    let cfg = d.cfg();
    d.write("10-calico.conflist", CALICO);
    d.write("10-calico.json", CALICO);
    install_once(&cfg).unwrap();
    assert_eq!(
        d.names(),
        vec![
            "10-calico.conflist".to_string(),
            "10-calico.json".to_string()
        ]
    );
    assert_eq!(types(&d.read("10-calico.json")), vec!["calico", "portmap"]);
}

#[tokio::test]
async fn a_deleted_plugin_binary_is_back_on_its_event_not_on_the_next_poll() {
    let d = Dirs::new();
    let cfg = d.cfg();
    let binary = cfg.bin_dir.join(PLUGIN_TYPE);
    d.write("10-calico.conflist", CALICO);
    let mut watching = Watching::start(cfg, NO_POLL);
    assert_eq!(
        watching.next("the first pass").await.0,
        Pass::Wrote(d.cfg().conf_dir.join("10-calico.conflist"))
    );
    assert!(binary.is_file());
    std::fs::remove_file(&binary).unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !binary.is_file() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ambit-cni not back in the bin dir within {PATIENCE:?} (with a {NO_POLL:?} poll, \
             only its deletion's event brings it)"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        std::fs::read(d.0.join("ambit-cni.src")).unwrap()
    );
}

/// Another agent's binary and entry (an upgrade's new agent, while this one drains).
fn other_agents(d: &Dirs) {
    let cfg = d.cfg();
    std::fs::write(cfg.bin_dir.join(PLUGIN_TYPE), b"#!/bin/sh\necho newer\n").unwrap();
    let mut config = d.read("10-calico.conflist");
    config["plugins"][2] = json!({"type": PLUGIN_TYPE, "runDir": "/var/run/ambit", "newer": true});
    rewrite_as_primary(d, "10-calico.conflist", &config.to_string());
}

#[test]
fn a_later_pass_leaves_another_agents_binary_and_entry_and_puts_back_what_is_missing() {
    let d = Dirs::new();
    let cfg = d.cfg();
    let binary = cfg.bin_dir.join(PLUGIN_TYPE);
    d.write("10-calico.conflist", CALICO);
    install_once(&cfg).unwrap();
    other_agents(&d);
    assert_eq!(install_again(&cfg).unwrap(), None);
    assert_eq!(std::fs::read(&binary).unwrap(), b"#!/bin/sh\necho newer\n");
    assert_eq!(d.read("10-calico.conflist")["plugins"][2]["newer"], true);
    // Gone: put back, ours.
    std::fs::remove_file(&binary).unwrap();
    rewrite_as_primary(&d, "10-calico.conflist", CALICO);
    assert!(install_again(&cfg).unwrap().is_some());
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        std::fs::read(&cfg.plugin).unwrap()
    );
    assert_eq!(d.read("10-calico.conflist")["plugins"][2], cfg.entry());
    // A first pass (an agent starting) takes over.
    other_agents(&d);
    assert!(install_once(&cfg).unwrap().is_some());
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        std::fs::read(&cfg.plugin).unwrap()
    );
    assert_eq!(d.read("10-calico.conflist")["plugins"][2], cfg.entry());
}

#[tokio::test]
async fn the_watch_does_not_undo_another_agents_install_on_its_events() {
    let d = Dirs::new();
    let cfg = d.cfg();
    let file = cfg.conf_dir.join("10-calico.conflist");
    d.write("10-calico.conflist", CALICO);
    let mut watching = Watching::start(cfg.clone(), NO_POLL);
    assert_eq!(
        watching.next("the first pass").await.0,
        Pass::Wrote(file.clone())
    );
    assert_eq!(watching.next("our own writes").await.0, Pass::Unchanged);
    other_agents(&d);
    // Their writes are events: a pass, which leaves them.
    assert_eq!(
        watching.next("the other agent's writes").await.0,
        Pass::Unchanged
    );
    assert_eq!(
        std::fs::read(cfg.bin_dir.join(PLUGIN_TYPE)).unwrap(),
        b"#!/bin/sh\necho newer\n"
    );
    assert_eq!(d.read("10-calico.conflist")["plugins"][2]["newer"], true);
}

#[test]
fn a_pass_of_the_watch_after_uninstall_installs_nothing() {
    let d = Dirs::new();
    let cfg = d.cfg();
    d.write(
        "10-calico.conflist",
        r#"{"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "calico"}]}"#,
    );
    // The watch runs its passes with a clone of the agent's config.
    let watch_cfg = cfg.clone();
    assert!(install_once(&watch_cfg).unwrap().is_some());
    uninstall(&cfg).unwrap();
    // A pass queued before the uninstall runs after it: the entry stays out.
    assert_eq!(install_once(&watch_cfg).unwrap(), None);
    assert_eq!(types(&d.read("10-calico.conflist")), vec!["calico"]);
    assert!(!cfg.bin_dir.join(PLUGIN_TYPE).exists());
}
