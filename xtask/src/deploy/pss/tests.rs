//! Each control refuses a pod that breaks it and admits the same pod without the break, so every
//! rule is shown able to fail.

use serde::Deserialize as _;
use serde_json::{json, Value};

use super::*;

/// A pod every level admits: restricted's duties done, nothing more.
fn base() -> Value {
    json!({
        "metadata": {},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [app(json!({}))],
        },
    })
}

/// The base pod's container "app" with `patch` merged in.
fn app(patch: Value) -> Value {
    let mut c = json!({
        "name": "app",
        "image": "app",
        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
    });
    merge(&mut c, &patch);
    c
}

/// RFC 7386 merge patch: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) else {
        *target = patch.clone();
        return;
    };
    for (key, value) in p {
        if value.is_null() {
            t.remove(key);
        } else {
            merge(t.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The base pod with `patch` merged into the whole pod (`{"spec": ..., "metadata": ...}`).
fn pod(patch: Value) -> Pod {
    let mut v = base();
    merge(&mut v, &patch);
    Pod::deserialize(v).expect("a pod")
}

fn spec(patch: Value) -> Value {
    json!({ "spec": patch })
}

fn containers(patch: Value) -> Value {
    spec(json!({ "containers": [app(patch)] }))
}

#[track_caller]
fn refuses(level: Level, patch: Value, reason: &str) -> String {
    let found = check(level, &pod(patch.clone()));
    let Some(v) = found.iter().find(|v| v.reason == reason) else {
        panic!("{level} admitted {patch} (wanted {reason:?}); found {found:?}");
    };
    v.detail.clone()
}

#[track_caller]
fn admits(level: Level, patch: Value) {
    let found = check(level, &pod(patch.clone()));
    assert!(found.is_empty(), "{level} refused {patch}: {found:?}");
}

#[test]
fn the_base_pod_passes_every_level() {
    for level in [Level::Privileged, Level::Baseline, Level::Restricted] {
        admits(level, json!({}));
    }
}

#[test]
fn levels_parse_and_misspellings_do_not() {
    assert_eq!("restricted".parse::<Level>().unwrap(), Level::Restricted);
    assert!("Baseline".parse::<Level>().is_err());
    assert!(Level::Privileged < Level::Baseline && Level::Baseline < Level::Restricted);
}

#[test]
fn privileged_imposes_nothing() {
    let agent = json!({
        "spec": {
            "hostPID": true,
            "hostNetwork": true,
            "containers": [app(json!({"securityContext": {
                "privileged": true,
                "capabilities": {"add": ["SYS_ADMIN"]},
                "appArmorProfile": {"type": "Unconfined"},
                "seLinuxOptions": {"type": "spc_t"},
            }}))],
            "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf"}}],
        },
    });
    admits(Level::Privileged, agent.clone());
    assert_eq!(check(Level::Baseline, &pod(agent)).len(), 6);
}

#[test]
fn host_namespaces() {
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        let detail = refuses(
            Level::Baseline,
            spec(json!({ field: true })),
            "host namespaces",
        );
        assert_eq!(detail, format!("{field}=true"));
        admits(Level::Baseline, spec(json!({ field: false })));
    }
}

#[test]
fn privileged_containers() {
    let init = |privileged: bool| {
        spec(
            json!({"initContainers": [{"name": "init", "securityContext": {
                "privileged": privileged,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
            }}]}),
        )
    };
    let detail = refuses(Level::Baseline, init(true), "privileged");
    assert_eq!(
        detail,
        "container \"init\" must not set securityContext.privileged=true"
    );
    admits(Level::Restricted, init(false));
}

#[test]
fn capabilities_beyond_the_default_set() {
    let add = |caps: Value| containers(json!({"securityContext": {"capabilities": {"add": caps}}}));
    let detail = refuses(
        Level::Baseline,
        add(json!(["NET_ADMIN", "BPF", "CHOWN"])),
        "non-default capabilities",
    );
    assert_eq!(
        detail,
        "container \"app\" must not include \"BPF\", \"NET_ADMIN\" in securityContext.capabilities.add"
    );
    admits(
        Level::Baseline,
        add(json!(["CHOWN", "NET_BIND_SERVICE", "SYS_CHROOT"])),
    );
}

#[test]
fn host_path_volumes() {
    let volume = |source: Value| spec(json!({"volumes": [merge_source(source)]}));
    let detail = refuses(
        Level::Baseline,
        volume(json!({"hostPath": {"path": "/"}})),
        "hostPath volumes",
    );
    assert_eq!(detail, "volume \"v\"");
    admits(Level::Baseline, volume(json!({"emptyDir": {}})));
}

fn merge_source(source: Value) -> Value {
    let mut v = json!({"name": "v"});
    merge(&mut v, &source);
    v
}

#[test]
fn host_ports() {
    let port =
        |host: i64| containers(json!({"ports": [{"containerPort": 8080, "hostPort": host}]}));
    let detail = refuses(Level::Baseline, port(80), "hostPort");
    assert_eq!(detail, "container \"app\" must not use hostPort 80");
    admits(Level::Baseline, port(0));
    admits(
        Level::Baseline,
        containers(json!({"ports": [{"containerPort": 8080}]})),
    );
}

#[test]
fn apparmor_profiles() {
    let container =
        |kind: &str| containers(json!({"securityContext": {"appArmorProfile": {"type": kind}}}));
    refuses(
        Level::Baseline,
        container("Unconfined"),
        "forbidden AppArmor profile",
    );
    admits(Level::Baseline, container("RuntimeDefault"));
    admits(Level::Baseline, container("Localhost"));
    let pod_level = spec(json!({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}));
    let detail = refuses(Level::Baseline, pod_level, "forbidden AppArmor profile");
    assert!(detail.starts_with("pod must not"), "{detail}");
    let annotation = |value: &str| {
        json!({"metadata": {"annotations": {
            "container.apparmor.security.beta.kubernetes.io/app": value,
        }}})
    };
    refuses(
        Level::Baseline,
        annotation("unconfined"),
        "forbidden AppArmor profile",
    );
    admits(Level::Baseline, annotation("runtime/default"));
    admits(Level::Baseline, annotation("localhost/my-profile"));
}

#[test]
fn selinux_options() {
    let options = |o: Value| containers(json!({"securityContext": {"seLinuxOptions": o}}));
    refuses(
        Level::Baseline,
        options(json!({"type": "spc_t"})),
        "seLinuxOptions",
    );
    refuses(
        Level::Baseline,
        options(json!({"user": "system_u"})),
        "seLinuxOptions",
    );
    refuses(
        Level::Baseline,
        options(json!({"role": "sysadm_r"})),
        "seLinuxOptions",
    );
    let pod_level = spec(json!({"securityContext": {"seLinuxOptions": {"type": "unconfined_t"}}}));
    refuses(Level::Baseline, pod_level, "seLinuxOptions");
    admits(
        Level::Baseline,
        options(json!({"type": "container_t", "level": "s0:c1,c2"})),
    );
    admits(
        Level::Baseline,
        options(json!({"type": "container_engine_t"})),
    );
}

#[test]
fn proc_mount() {
    let mount = |kind: &str| containers(json!({"securityContext": {"procMount": kind}}));
    refuses(Level::Baseline, mount("Unmasked"), "procMount");
    admits(Level::Baseline, mount("Default"));
    let mut in_userns = mount("Unmasked");
    merge(&mut in_userns, &spec(json!({"hostUsers": false})));
    admits(Level::Baseline, in_userns);
}

#[test]
fn seccomp_unconfined() {
    let container =
        |kind: &str| containers(json!({"securityContext": {"seccompProfile": {"type": kind}}}));
    refuses(Level::Baseline, container("Unconfined"), "seccompProfile");
    let pod_level = spec(json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}));
    refuses(Level::Baseline, pod_level, "seccompProfile");
    admits(Level::Restricted, container("Localhost"));
    // Baseline does not ask for a profile; restricted does (below).
    admits(
        Level::Baseline,
        spec(json!({"securityContext": {"seccompProfile": null}})),
    );
}

#[test]
fn sysctls() {
    let sysctl =
        |name: &str| spec(json!({"securityContext": {"sysctls": [{"name": name, "value": "1"}]}}));
    let detail = refuses(
        Level::Baseline,
        sysctl("kernel.msgmax"),
        "forbidden sysctls",
    );
    assert_eq!(detail, "kernel.msgmax");
    refuses(
        Level::Baseline,
        sysctl("net.core.somaxconn"),
        "forbidden sysctls",
    );
    admits(Level::Baseline, sysctl("net.ipv4.tcp_keepalive_time"));
    admits(Level::Baseline, sysctl("net.ipv4.tcp_rmem"));
}

#[test]
fn probe_and_lifecycle_hosts() {
    let probe = |host: Value| {
        containers(json!({"livenessProbe": {"httpGet": {"path": "/", "port": 80, "host": host}}}))
    };
    refuses(
        Level::Baseline,
        probe(json!("169.254.169.254")),
        "probe or lifecycle host",
    );
    admits(Level::Baseline, probe(json!("")));
    admits(Level::Baseline, probe(Value::Null));
    let hook =
        containers(json!({"lifecycle": {"preStop": {"tcpSocket": {"port": 1, "host": "db"}}}}));
    refuses(Level::Baseline, hook, "probe or lifecycle host");
}

#[test]
fn windows_host_process() {
    let host_process =
        |on: bool| spec(json!({"securityContext": {"windowsOptions": {"hostProcess": on}}}));
    refuses(Level::Baseline, host_process(true), "hostProcess");
    admits(Level::Baseline, host_process(false));
}

#[test]
fn restricted_includes_baseline() {
    refuses(
        Level::Restricted,
        spec(json!({"hostPID": true})),
        "host namespaces",
    );
}

#[test]
fn restricted_volume_types() {
    let volume = |source: Value| spec(json!({"volumes": [merge_source(source)]}));
    // The restricted check replaces baseline's hostPath one, as in the plugin.
    let host_path = volume(json!({"hostPath": {"path": "/"}}));
    let detail = refuses(
        Level::Restricted,
        host_path.clone(),
        "restricted volume types",
    );
    assert_eq!(detail, "volume \"v\" uses \"hostPath\"");
    assert!(check(Level::Restricted, &pod(host_path))
        .iter()
        .all(|v| v.reason != "hostPath volumes"));
    refuses(
        Level::Restricted,
        volume(json!({"nfs": {"server": "s", "path": "/"}})),
        "restricted volume types",
    );
    admits(
        Level::Baseline,
        volume(json!({"nfs": {"server": "s", "path": "/"}})),
    );
    for source in [
        json!({"configMap": {"name": "c"}}),
        json!({"secret": {"secretName": "s"}}),
        json!({"projected": {"sources": []}}),
        json!({"emptyDir": {}}),
        json!({"image": {"reference": "r"}}),
        json!({"persistentVolumeClaim": {"claimName": "c"}}),
        json!({}),
    ] {
        admits(Level::Restricted, volume(source));
    }
}

#[test]
fn privilege_escalation() {
    let escalation =
        |v: Value| containers(json!({"securityContext": {"allowPrivilegeEscalation": v}}));
    refuses(
        Level::Restricted,
        escalation(Value::Null),
        "allowPrivilegeEscalation != false",
    );
    refuses(
        Level::Restricted,
        escalation(json!(true)),
        "allowPrivilegeEscalation != false",
    );
    admits(Level::Baseline, escalation(json!(true)));
    let mut windows = escalation(Value::Null);
    merge(&mut windows, &spec(json!({"os": {"name": "windows"}})));
    admits(Level::Restricted, windows);
}

#[test]
fn run_as_non_root() {
    let unset = spec(json!({"securityContext": {"runAsNonRoot": null}}));
    let detail = refuses(Level::Restricted, unset.clone(), "runAsNonRoot != true");
    assert_eq!(
        detail,
        "pod or container \"app\" must set securityContext.runAsNonRoot=true"
    );
    admits(Level::Baseline, unset.clone());
    let mut per_container = unset.clone();
    merge(
        &mut per_container,
        &containers(json!({"securityContext": {"runAsNonRoot": true}})),
    );
    admits(Level::Restricted, per_container);
    let overridden = containers(json!({"securityContext": {"runAsNonRoot": false}}));
    let detail = refuses(Level::Restricted, overridden, "runAsNonRoot != true");
    assert_eq!(
        detail,
        "container \"app\" must not set securityContext.runAsNonRoot=false"
    );
    let mut in_userns = unset;
    merge(&mut in_userns, &spec(json!({"hostUsers": false})));
    admits(Level::Restricted, in_userns);
}

#[test]
fn run_as_user_zero() {
    let user = |uid: i64| containers(json!({"securityContext": {"runAsUser": uid}}));
    refuses(Level::Restricted, user(0), "runAsUser=0");
    refuses(
        Level::Restricted,
        spec(json!({"securityContext": {"runAsUser": 0}})),
        "runAsUser=0",
    );
    admits(Level::Restricted, user(1000));
    admits(Level::Baseline, user(0));
}

#[test]
fn seccomp_required() {
    let unset = spec(json!({"securityContext": {"seccompProfile": null}}));
    let detail = refuses(Level::Restricted, unset.clone(), "seccompProfile");
    assert!(
        detail.starts_with("pod or container \"app\" must set"),
        "{detail}"
    );
    let mut per_container = unset.clone();
    merge(
        &mut per_container,
        &containers(json!({"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}})),
    );
    admits(Level::Restricted, per_container);
    let mut windows = unset;
    merge(&mut windows, &spec(json!({"os": {"name": "windows"}})));
    admits(Level::Restricted, windows);
}

#[test]
fn restricted_capabilities() {
    let caps = |c: Value| containers(json!({"securityContext": {"capabilities": c}}));
    let detail = refuses(
        Level::Restricted,
        caps(json!({"drop": []})),
        "unrestricted capabilities",
    );
    assert_eq!(
        detail,
        "container \"app\" must set securityContext.capabilities.drop=[\"ALL\"]"
    );
    let detail = refuses(
        Level::Restricted,
        caps(json!({"drop": ["ALL"], "add": ["CHOWN", "NET_BIND_SERVICE"]})),
        "unrestricted capabilities",
    );
    assert_eq!(
        detail,
        "container \"app\" must not include \"CHOWN\" in securityContext.capabilities.add"
    );
    admits(
        Level::Restricted,
        caps(json!({"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]})),
    );
    // CHOWN is in the default set: baseline lets it be added.
    admits(Level::Baseline, caps(json!({"drop": [], "add": ["CHOWN"]})));
}
