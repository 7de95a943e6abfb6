//! The image `cargo xtask image` builds runs as deploy/daemonset.yaml runs it, under Debian's
//! containerd and runc: imported with `ctr`, the agent container started with the DaemonSet's
//! capabilities (all others dropped), read-only root filesystem, the runtime's default seccomp
//! profile, the host's PID namespace, the host's bpffs and cgroup hierarchy mounted where the
//! DaemonSet mounts them, its own network namespace on a CNI bridge and the DaemonSet's own
//! arguments (local mode instead of `--kube`, test paths instead of the node's). It answers the
//! readiness probe on the DaemonSet's port, has attached its programs, stops on SIGTERM, and the
//! image's `ambit uninstall` then leaves no pin and no program.
//!
//! Needs root, the Debian packages of the containerd harness, bpftool, and a build of the
//! workspace's binaries with the `image-test` profile (the test runs `xtask image --profile
//! image-test`, which builds them; `cargo xtask test` starts that build early). That profile is
//! the dev profile without debug info: the same code, static linking and checks as the shipped
//! image, for 40 % of the release build's CPU.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::containerd::Containerd;

const WAIT: Duration = Duration::from_secs(60);

/// The image's name, as `xtask image` gives it and the DaemonSet runs it.
const IMAGE_NAME: &str = "ghcr.io/ambit-mesh/ambit";

/// containerd's default capabilities for a container (oci.defaultUnixCaps): ctr 1.6 cannot drop
/// `ALL`, so each is dropped by name, which gives what `drop: [ALL]` gives.
const RUNTIME_DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ sits in the workspace root")
        .to_owned()
}

/// The DaemonSet's agent container.
fn agent_container() -> Value {
    let path = workspace().join("deploy/daemonset.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let daemonset: Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
        .cloned()
        .unwrap_or_else(|| panic!("{}: no container `agent`", path.display()))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"))
                .to_owned()
        })
        .collect()
}

/// The readiness probe's port number and path.
fn readiness_probe(container: &Value) -> (u16, String) {
    let probe = &container["readinessProbe"]["httpGet"];
    let path = probe["path"]
        .as_str()
        .expect("readinessProbe path")
        .to_owned();
    let port = match &probe["port"] {
        Value::Number(n) => n.as_u64().expect("port number"),
        Value::String(name) => container["ports"]
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["name"] == name.as_str()))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named {name}")),
        other => panic!("readinessProbe port {other}"),
    };
    (port as u16, path)
}

/// Pins and a cgroup of this test, removed when it ends, also on a panic.
struct HostPaths {
    pins: PathBuf,
    cgroup: PathBuf,
}

impl HostPaths {
    /// The kubelet's parent of every pod (systemd cgroup driver) in this test's cgroup "root".
    fn kubepods(&self) -> PathBuf {
        self.cgroup.join("kubepods.slice")
    }
}

impl Drop for HostPaths {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pins);
        let _ = fs::remove_dir(self.kubepods());
        let _ = fs::remove_dir(&self.cgroup);
    }
}

/// `GET path` on `addr`: the status code and the body, or the connection's error.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The names of the programs attached to `cgroup` (bpftool).
fn attached(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap_or_else(|e| panic!("bpftool (apt-get install bpftool): {e}"));
    assert!(
        out.status.success(),
        "bpftool cgroup show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    let programs: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    programs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// The IPv4 address host-local leased on `network` (its lease files are named by address).
fn leased_ip(ctrd: &Containerd, network: &str) -> Option<Ipv4Addr> {
    fs::read_dir(ctrd.cni_cache_dir().join("networks").join(network))
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| e.file_name().to_string_lossy().parse().ok())
}

/// A primary CNI's config, as a node has before the agent chains itself in.
const PRIMARY_CONFLIST: &str = r#"{"cniVersion":"1.0.0","name":"primary","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.244.7.0/24"}}]}"#;

/// The node's CNI config and bin dirs and the agent's run dir, in the test's directory.
struct NodeCni {
    conf: PathBuf,
    bin: PathBuf,
    run: PathBuf,
}

impl NodeCni {
    fn new(dir: &Path) -> NodeCni {
        let cni = NodeCni {
            conf: dir.join("node-cni-conf"),
            bin: dir.join("node-cni-bin"),
            run: dir.join("node-run-ambit"),
        };
        for d in [&cni.conf, &cni.bin, &cni.run] {
            fs::create_dir_all(d).expect("node CNI dir");
        }
        fs::write(cni.conflist(), PRIMARY_CONFLIST).expect("primary conflist");
        cni
    }

    fn conflist(&self) -> PathBuf {
        self.conf.join("10-primary.conflist")
    }

    /// (host dir, where the DaemonSet mounts it)
    fn mounts(&self) -> Vec<(PathBuf, &'static str)> {
        vec![
            (self.conf.clone(), "/host/etc/cni/net.d"),
            (self.bin.clone(), "/host/opt/cni/bin"),
            (self.run.clone(), "/var/run/ambit"),
        ]
    }

    fn installed(&self) -> bool {
        self.bin.join("ambit-cni").is_file()
            && fs::read_to_string(self.conflist()).is_ok_and(|c| c.contains("\"ambit-cni\""))
    }
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it() {
    let ctrd = Containerd::start().expect("start containerd");
    let tarball = ctrd.dir().join("ambit-image.tar");
    let built = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("image")
        .args(["--profile", xtask::IMAGE_TEST_PROFILE])
        .arg("--out")
        .arg(&tarball)
        .current_dir(workspace())
        .status()
        .expect("run xtask image");
    assert!(built.success(), "xtask image failed ({built})");
    let image = ctrd.import(&tarball, IMAGE_NAME).expect("ctr image import");

    let agent = agent_container();
    let (probe_port, probe_path) = readiness_probe(&agent);
    let security = &agent["securityContext"];
    assert_eq!(
        strings(&security["capabilities"]["drop"]),
        ["ALL"],
        "the DaemonSet drops every capability it does not add"
    );
    assert_eq!(security["readOnlyRootFilesystem"], true);

    // Test paths for what the DaemonSet takes from the node: no real install is touched.
    let me = std::process::id();
    let host = HostPaths {
        pins: PathBuf::from(format!("/sys/fs/bpf/ambit-image-test-{me}")),
        cgroup: ctrd
            .cgroup_v2_dir()
            .expect("the harness's cgroup")
            .with_file_name(format!("ambit-image-test-{me}")),
    };
    fs::create_dir_all(host.kubepods()).expect("capture cgroup");
    let cgroup_in_container = Path::new("/host/sys/fs/cgroup").join(
        host.cgroup
            .strip_prefix("/sys/fs/cgroup")
            .expect("the cgroup v2 hierarchy sits under /sys/fs/cgroup"),
    );
    let config = ctrd.dir().join("config");
    fs::create_dir_all(&config).expect("config dir");
    fs::write(
        config.join("mesh.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n",
    )
    .expect("config");
    let ca = ctrd.dir().join("ca");
    fs::create_dir_all(&ca).expect("ca dir");
    let made = ctrd
        .container("ca-init", &image)
        .options([
            "--mount",
            &format!("type=bind,src={},dst=/ca,options=rbind:rw", ca.display()),
        ])
        .args(["ambit", "ca-init", "--dir", "/ca"])
        .start()
        .expect("run ca-init")
        .wait(WAIT)
        .expect("ca-init ends");
    assert!(made.status.success(), "ca-init: {made:?}");

    // The DaemonSet's arguments, with test values for the node's: local mode (files, and the local
    // CA instead of the in-cluster one, which needs an API server), this test's pins and cgroup,
    // and this process's netns as the node's (through the host PID namespace, as the DaemonSet's
    // /proc/1/ns/net; PID 1 may be out of reach in a test sandbox).
    let args: Vec<String> = strings(&agent["args"])
        .into_iter()
        .filter_map(|arg| {
            let (flag, _) = arg.split_once('=').unwrap_or((&arg, ""));
            match flag {
                "--kube" => Some("--config=/etc/ambit/config".to_owned()),
                "--node" => Some("--node=node-1".to_owned()),
                "--bpffs" => Some(format!("--bpffs={}", host.pins.display())),
                "--cgroup" => Some(format!("--cgroup={}", cgroup_in_container.display())),
                "--node-netns" => Some(format!("--node-netns=/proc/{me}/ns/net")),
                "--ca-addr" => Some("--ca-dir=/etc/ambit/ca".to_owned()),
                "--ca-roots" | "--ca-token" => None,
                _ => Some(arg),
            }
        })
        .collect();
    let mut options: Vec<String> = vec!["--read-only".into(), "--seccomp".into()];
    for cap in RUNTIME_DEFAULT_CAPS {
        options.extend(["--cap-drop".into(), format!("CAP_{cap}")]);
    }
    for cap in strings(&security["capabilities"]["add"]) {
        options.extend(["--cap-add".into(), format!("CAP_{cap}")]);
    }
    let mount = |src: &Path, dst: &str, mode: &str| {
        [
            "--mount".to_owned(),
            format!(
                "type=bind,src={},dst={dst},options=rbind:{mode}",
                src.display()
            ),
        ]
    };
    options.extend(mount(Path::new("/sys/fs/bpf"), "/sys/fs/bpf", "rw"));
    options.extend(mount(
        Path::new("/sys/fs/cgroup"),
        "/host/sys/fs/cgroup",
        "ro",
    ));
    options.extend(mount(&ca, "/etc/ambit/ca", "ro"));
    options.extend(mount(&config, "/etc/ambit/config", "ro"));
    // The node's CNI directories and the plugin's socket directory, as the DaemonSet's hostPaths:
    // a primary CNI's conflist for the agent to chain ambit-cni into.
    let node_cni = NodeCni::new(ctrd.dir());
    options.extend(
        node_cni
            .mounts()
            .into_iter()
            .flat_map(|(src, dst)| mount(&src, dst, "rw")),
    );
    options.extend([
        "--with-ns".to_owned(),
        format!("pid:/proc/{me}/ns/pid"),
        "--env".to_owned(),
        "AMBIT_LOG=info".to_owned(),
        // The DaemonSet's downward-API value.
        "--env".to_owned(),
        "POD_NAMESPACE=ambit-system".to_owned(),
    ]);
    let net = ctrd.reserve_network().expect("a network of this test");
    ctrd.write_reserved_network("10-image.conflist", "1.0.0", "imagetest", &net, &[])
        .expect("pod network");

    let mut container = ctrd
        .container("agent", &image)
        .cni()
        .options(options)
        .args(std::iter::once("ambit".to_owned()).chain(args))
        .start()
        .expect("start the agent");
    container.wait_running(WAIT).expect("the agent runs");
    let ip = leased_ip(&ctrd, "imagetest").expect("the pod's address");

    // The kubelet's probe: the pod's address, the DaemonSet's port and path.
    let probe = SocketAddr::from((ip, probe_port));
    let deadline = Instant::now() + WAIT;
    let ready = loop {
        let answer = http_get(probe, &probe_path);
        if matches!(answer, Ok((200, _))) || Instant::now() > deadline {
            break answer;
        }
        thread::sleep(Duration::from_millis(50));
    };
    match &ready {
        Ok((200, body)) => assert_eq!(body, "ready\n"),
        other => panic!(
            "GET {probe}{probe_path}: {other:?}\nagent: {}\n{}",
            container.stdout(),
            container.stderr()
        ),
    }
    // The DaemonSet's `--cgroup-attach` (its default, `auto`): at the kubelet's pod cgroup, so the
    // node's own processes outside it do not run the programs.
    let programs = attached(&host.kubepods());
    for program in ["ambit_conn4", "ambit_conn6", "ambit_sockops"] {
        assert!(
            programs.iter().any(|p| p == program),
            "{program} attached to {}: {programs:?}",
            host.kubepods().display()
        );
    }
    assert_eq!(
        attached(&host.cgroup),
        Vec::<String>::new(),
        "nothing attached at the cgroup root {}",
        host.cgroup.display()
    );
    assert!(host.pins.is_dir(), "pins under {}", host.pins.display());
    // The agent installed the CNI plugin from its own image: the static ambit-cni in the node's
    // bin dir, and an entry in the primary CNI's conflist.
    let deadline = Instant::now() + WAIT;
    while !node_cni.installed() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        node_cni.installed(),
        "ambit-cni installed: bin {:?}, conflist {}\nagent: {}",
        fs::read_dir(&node_cni.bin).map(|d| d
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect::<Vec<_>>()),
        fs::read_to_string(node_cni.conflist()).unwrap_or_default(),
        container.stderr()
    );
    // Its entry lets the agent's own namespace (and kube-system, as istio-cni) start while no
    // agent is up: after a reboot the agent's pod itself goes through this chain.
    let conflist: serde_json::Value =
        serde_json::from_slice(&fs::read(node_cni.conflist()).expect("conflist")).expect("JSON");
    let entry = conflist["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["type"] == "ambit-cni"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        entry["excludeNamespaces"],
        serde_json::json!(["kube-system", "ambit-system"]),
        "{conflist}"
    );

    // `kubectl delete`: SIGTERM, and the agent exits by itself, leaving capture pinned.
    let killed = ctrd
        .ctr()
        .args(["tasks", "kill", "--signal", "SIGTERM", container.id()])
        .status()
        .expect("ctr tasks kill");
    assert!(killed.success());
    let exit = container.wait(WAIT).expect("the agent stops on SIGTERM");
    assert!(exit.status.success(), "the agent's exit: {exit:?}");
    assert!(
        !attached(&host.kubepods()).is_empty(),
        "capture stays pinned"
    );

    // `ambit uninstall`, from the same image, with the host's bpffs.
    let uninstalled = ctrd
        .container("uninstall", &image)
        .options(mount(Path::new("/sys/fs/bpf"), "/sys/fs/bpf", "rw"))
        .args([
            "ambit".to_owned(),
            "uninstall".to_owned(),
            format!("--bpffs={}", host.pins.display()),
        ])
        .start()
        .expect("run uninstall")
        .wait(WAIT)
        .expect("uninstall ends");
    assert!(uninstalled.status.success(), "uninstall: {uninstalled:?}");
    let cni_uninstalled = ctrd
        .container("cni-uninstall", &image)
        .options(
            node_cni
                .mounts()
                .into_iter()
                .flat_map(|(src, dst)| mount(&src, dst, "rw")),
        )
        .args(
            [
                "ambit",
                "cni-uninstall",
                "--cni-conf-dir=/host/etc/cni/net.d",
                "--cni-bin-dir=/host/opt/cni/bin",
                "--cni-dir=/var/run/ambit",
            ]
            .map(str::to_owned),
        )
        .start()
        .expect("run cni-uninstall")
        .wait(WAIT)
        .expect("cni-uninstall ends");
    assert!(
        cni_uninstalled.status.success(),
        "cni-uninstall: {cni_uninstalled:?}"
    );
    assert!(
        !node_cni.bin.join("ambit-cni").exists(),
        "ambit-cni left in the node's bin dir"
    );
    let conflist: Value = serde_json::from_str(
        &fs::read_to_string(node_cni.conflist()).expect("the primary conflist stays"),
    )
    .expect("the conflist is JSON");
    assert_eq!(
        conflist,
        serde_json::from_str::<Value>(PRIMARY_CONFLIST).expect("JSON"),
        "the primary CNI's conflist as it was"
    );
    assert!(!host.pins.exists(), "pins left in {}", host.pins.display());
    let deadline = Instant::now() + WAIT;
    while !attached(&host.kubepods()).is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        attached(&host.kubepods()),
        Vec::<String>::new(),
        "programs left attached"
    );
}
