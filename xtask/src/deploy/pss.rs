//! Pod Security admission's `baseline` and `restricted` levels, checked the way the API server's
//! PodSecurity plugin checks a pod at version `latest` (k8s.io/pod-security-admission/policy, as of
//! Kubernetes 1.35). Each rule is one control of kubernetes.io/docs/concepts/security/
//! pod-security-standards; a rule answers with the plugin's reason, so messages read like its own
//! (`violates PodSecurity "baseline:latest": host namespaces (hostPID=true), ...`).

use std::{collections::BTreeSet, fmt, str::FromStr};

use anyhow::{bail, Error};

use super::pod::{
    Container, Pod, PodSecurityContext, Profile, SeLinuxOptions, SecurityContext, WindowsOptions,
};

/// A Pod Security Standards level, least strict first, so `>=` reads "at least as strict".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl FromStr for Level {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "privileged" => Self::Privileged,
            "baseline" => Self::Baseline,
            "restricted" => Self::Restricted,
            _ => bail!("{s:?} is not a Pod Security level (privileged, baseline or restricted)"),
        })
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        })
    }
}

/// One failed control: the plugin's reason and what broke it.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    pub reason: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.detail)
    }
}

type Rule = fn(&Pod) -> Option<Violation>;

const BASELINE: [Rule; 11] = [
    host_process,
    host_namespaces,
    privileged,
    capabilities_baseline,
    host_ports,
    app_armor,
    se_linux,
    proc_mount,
    seccomp_baseline,
    sysctls,
    probe_hosts,
];

const RESTRICTED: [Rule; 6] = [
    volume_types,
    privilege_escalation,
    run_as_non_root,
    run_as_user,
    seccomp_restricted,
    capabilities_restricted,
];

/// Every control of `level` (and of the levels below it) that `pod` breaks.
pub fn check(level: Level, pod: &Pod) -> Vec<Violation> {
    let mut rules: Vec<Rule> = Vec::new();
    if level >= Level::Baseline {
        rules.extend(BASELINE);
    }
    match level {
        Level::Privileged => {}
        // The restricted volume check replaces the baseline hostPath one, as in the plugin.
        Level::Baseline => rules.push(host_path),
        Level::Restricted => rules.extend(RESTRICTED),
    }
    rules.iter().filter_map(|rule| rule(pod)).collect()
}

/// The capabilities a container runtime grants by default, which baseline lets a container add.
const DEFAULT_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Namespaced sysctls isolated from other pods (the plugin's list at 1.32 and later).
const SAFE_SYSCTLS: [&str; 12] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// SELinux types baseline allows (`""`: the runtime's own choice).
const SELINUX_TYPES: [&str; 5] = [
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// Volume sources restricted allows: the core ones, and those defined through PersistentVolumes.
const RESTRICTED_VOLUMES: [&str; 9] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

const APPARMOR_ANNOTATION: &str = "container.apparmor.security.beta.kubernetes.io/";

fn host_process(pod: &Pod) -> Option<Violation> {
    let on = |o: &Option<WindowsOptions>| o.as_ref().and_then(|w| w.host_process) == Some(true);
    violation(
        "hostProcess",
        setters(pod, |s| on(&s.windows_options), |s| on(&s.windows_options)),
        "must not set securityContext.windowsOptions.hostProcess=true",
    )
}

fn host_namespaces(pod: &Pod) -> Option<Violation> {
    let spec = &pod.spec;
    let shared: Vec<&str> = [
        (spec.host_network, "hostNetwork=true"),
        (spec.host_pid, "hostPID=true"),
        (spec.host_ipc, "hostIPC=true"),
    ]
    .into_iter()
    .filter(|(set, _)| *set == Some(true))
    .map(|(_, name)| name)
    .collect();
    (!shared.is_empty()).then(|| Violation {
        reason: "host namespaces",
        detail: shared.join(", "),
    })
}

fn privileged(pod: &Pod) -> Option<Violation> {
    violation(
        "privileged",
        containers_where(pod, Container::privileged),
        "must not set securityContext.privileged=true",
    )
}

fn capabilities_baseline(pod: &Pod) -> Option<Violation> {
    let (containers, caps) = added_capabilities(pod, |cap| DEFAULT_CAPABILITIES.contains(&cap));
    violation(
        "non-default capabilities",
        containers,
        &format!(
            "must not include {} in securityContext.capabilities.add",
            quoted(&caps)
        ),
    )
}

fn host_path(pod: &Pod) -> Option<Violation> {
    let volumes: Vec<&str> = pod
        .spec
        .volumes
        .iter()
        .filter(|v| v.kind() == "hostPath")
        .map(|v| v.name.as_str())
        .collect();
    (!volumes.is_empty()).then(|| Violation {
        reason: "hostPath volumes",
        detail: format!("{} {}", plural("volume", volumes.len()), quoted(&volumes)),
    })
}

fn host_ports(pod: &Pod) -> Option<Violation> {
    let mut ports = BTreeSet::new();
    let containers = containers_where(pod, |c| {
        let used: Vec<i64> = c
            .ports
            .iter()
            .filter_map(|p| p.host_port.filter(|&port| port != 0))
            .collect();
        ports.extend(used.iter().copied());
        !used.is_empty()
    });
    let ports: Vec<String> = ports.iter().map(i64::to_string).collect();
    violation(
        "hostPort",
        containers,
        &format!("must not use hostPort {}", ports.join(", ")),
    )
}

fn app_armor(pod: &Pod) -> Option<Violation> {
    let bad = |p: &Option<Profile>| {
        p.as_ref()
            .is_some_and(|p| !matches!(p.kind.as_str(), "RuntimeDefault" | "Localhost"))
    };
    let mut found = setters(
        pod,
        |s| bad(&s.app_armor_profile),
        |s| bad(&s.app_armor_profile),
    );
    // The annotations that set the profile before the field existed (deprecated since 1.30).
    found.extend(
        pod.metadata
            .annotations
            .iter()
            .filter(|(key, value)| {
                key.starts_with(APPARMOR_ANNOTATION)
                    && !(value.is_empty()
                        || *value == "runtime/default"
                        || value.starts_with("localhost/"))
            })
            .map(|(key, value)| format!("annotation {key}={value:?}")),
    );
    violation(
        "forbidden AppArmor profile",
        found,
        "must not set an AppArmor profile other than RuntimeDefault or Localhost",
    )
}

fn se_linux(pod: &Pod) -> Option<Violation> {
    let bad = |o: &Option<SeLinuxOptions>| {
        o.as_ref().is_some_and(|o| {
            !SELINUX_TYPES.contains(&o.kind.as_str()) || !o.user.is_empty() || !o.role.is_empty()
        })
    };
    violation(
        "seLinuxOptions",
        setters(
            pod,
            |s| bad(&s.se_linux_options),
            |s| bad(&s.se_linux_options),
        ),
        &format!(
            "must set no seLinuxOptions user or role, and a type among {}",
            quoted(&SELINUX_TYPES[1..])
        ),
    )
}

fn proc_mount(pod: &Pod) -> Option<Violation> {
    // Kubernetes 1.35: any procMount in a user namespace, where the unmasked /proc is not the host's.
    if pod.spec.in_user_namespace() {
        return None;
    }
    violation(
        "procMount",
        containers_where(pod, |c| {
            c.security()
                .and_then(|s| s.proc_mount.as_deref())
                .is_some_and(|m| m != "Default")
        }),
        "must not set securityContext.procMount to anything but \"Default\"",
    )
}

fn seccomp_allowed(p: &Profile) -> bool {
    matches!(p.kind.as_str(), "RuntimeDefault" | "Localhost")
}

fn seccomp_baseline(pod: &Pod) -> Option<Violation> {
    let bad = |p: &Option<Profile>| p.as_ref().is_some_and(|p| !seccomp_allowed(p));
    violation(
        "seccompProfile",
        setters(pod, |s| bad(&s.seccomp_profile), |s| bad(&s.seccomp_profile)),
        "must not set securityContext.seccompProfile.type to anything but RuntimeDefault or Localhost",
    )
}

fn sysctls(pod: &Pod) -> Option<Violation> {
    let forbidden: Vec<&str> = pod
        .spec
        .security()
        .map(|s| s.sysctls.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|s| s.name.as_str())
        .filter(|name| !SAFE_SYSCTLS.contains(name))
        .collect();
    (!forbidden.is_empty()).then(|| Violation {
        reason: "forbidden sysctls",
        detail: forbidden.join(", "),
    })
}

fn probe_hosts(pod: &Pod) -> Option<Violation> {
    // Kubernetes 1.34: a probe or hook with a host could make the kubelet reach any address.
    violation(
        "probe or lifecycle host",
        containers_where(pod, |c| {
            c.handlers()
                .flat_map(|(_, h)| h.endpoints())
                .any(|e| e.host.as_deref().is_some_and(|h| !h.is_empty()))
        }),
        "must not set host in a probe or lifecycle handler",
    )
}

fn volume_types(pod: &Pod) -> Option<Violation> {
    let bad: Vec<_> = pod
        .spec
        .volumes
        .iter()
        .filter(|v| !RESTRICTED_VOLUMES.contains(&v.kind()))
        .collect();
    let names: Vec<&str> = bad.iter().map(|v| v.name.as_str()).collect();
    let kinds: BTreeSet<&str> = bad.iter().map(|v| v.kind()).collect();
    (!bad.is_empty()).then(|| Violation {
        reason: "restricted volume types",
        detail: format!(
            "{} {} {} {}",
            plural("volume", names.len()),
            quoted(&names),
            plural_verb("use", names.len()),
            quoted(&kinds.into_iter().collect::<Vec<_>>())
        ),
    })
}

fn privilege_escalation(pod: &Pod) -> Option<Violation> {
    // Since 1.25 the Linux-only restricted checks skip pods that declare a Windows OS.
    if pod.spec.is_windows() {
        return None;
    }
    violation(
        "allowPrivilegeEscalation != false",
        containers_where(pod, |c| {
            c.security().and_then(|s| s.allow_privilege_escalation) != Some(false)
        }),
        "must set securityContext.allowPrivilegeEscalation=false",
    )
}

fn run_as_non_root(pod: &Pod) -> Option<Violation> {
    if pod.spec.in_user_namespace() {
        return None;
    }
    let pod_level = pod.spec.security().and_then(|s| s.run_as_non_root);
    let mut explicit = Vec::new();
    if pod_level == Some(false) {
        explicit.push("pod".to_owned());
    }
    let mut implicit = Vec::new();
    for (_, c) in pod.spec.all_containers() {
        match c.security().and_then(|s| s.run_as_non_root) {
            Some(false) => explicit.push(format!("container {:?}", c.name)),
            None if pod_level != Some(true) => implicit.push(c.name.as_str()),
            _ => {}
        }
    }
    if !explicit.is_empty() {
        return violation(
            "runAsNonRoot != true",
            explicit,
            "must not set securityContext.runAsNonRoot=false",
        );
    }
    (!implicit.is_empty()).then(|| Violation {
        reason: "runAsNonRoot != true",
        detail: format!(
            "pod or {} {} must set securityContext.runAsNonRoot=true",
            plural("container", implicit.len()),
            quoted(&implicit)
        ),
    })
}

fn run_as_user(pod: &Pod) -> Option<Violation> {
    if pod.spec.in_user_namespace() {
        return None;
    }
    violation(
        "runAsUser=0",
        setters(
            pod,
            |s| s.run_as_user == Some(0),
            |s| s.run_as_user == Some(0),
        ),
        "must not set runAsUser=0",
    )
}

fn seccomp_restricted(pod: &Pod) -> Option<Violation> {
    if pod.spec.is_windows() {
        return None;
    }
    let pod_profile = pod.spec.security().and_then(|s| s.seccomp_profile.as_ref());
    let pod_set = pod_profile.is_some_and(seccomp_allowed);
    let unset: Vec<&str> = pod
        .spec
        .all_containers()
        .map(|(_, c)| c)
        .filter(|c| {
            c.security()
                .and_then(|s| s.seccomp_profile.as_ref())
                .is_none()
                && !pod_set
        })
        .map(|c| c.name.as_str())
        .collect();
    // An explicit bad value is baseline's to report; restricted adds the duty to set one.
    (!unset.is_empty()).then(|| Violation {
        reason: "seccompProfile",
        detail: format!(
            "pod or {} {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\"",
            plural("container", unset.len()),
            quoted(&unset)
        ),
    })
}

fn capabilities_restricted(pod: &Pod) -> Option<Violation> {
    if pod.spec.is_windows() {
        return None;
    }
    let no_drop_all = containers_where(pod, |c| {
        !c.security()
            .and_then(|s| s.capabilities.as_ref())
            .is_some_and(|caps| caps.drop.iter().any(|cap| cap == "ALL"))
    });
    let (adding, caps) = added_capabilities(pod, |cap| cap == "NET_BIND_SERVICE");
    let mut details = Vec::new();
    if !no_drop_all.is_empty() {
        details.push(format!(
            "{} must set securityContext.capabilities.drop=[\"ALL\"]",
            no_drop_all.join(" and ")
        ));
    }
    if !adding.is_empty() {
        details.push(format!(
            "{} must not include {} in securityContext.capabilities.add",
            adding.join(" and "),
            quoted(&caps)
        ));
    }
    (!details.is_empty()).then(|| Violation {
        reason: "unrestricted capabilities",
        detail: details.join("; "),
    })
}

/// "pod" if the pod's security context breaks a rule, then each container whose own one does.
fn setters(
    pod: &Pod,
    pod_bad: impl Fn(&PodSecurityContext) -> bool,
    container_bad: impl Fn(&SecurityContext) -> bool,
) -> Vec<String> {
    let mut found = Vec::new();
    if pod.spec.security().is_some_and(pod_bad) {
        found.push("pod".to_owned());
    }
    found.extend(containers_where(pod, |c| {
        c.security().is_some_and(&container_bad)
    }));
    found
}

/// `container "a"` for each container `pred` holds for.
fn containers_where(pod: &Pod, mut pred: impl FnMut(&Container) -> bool) -> Vec<String> {
    pod.spec
        .all_containers()
        .filter(|(_, c)| pred(c))
        .map(|(_, c)| format!("container {:?}", c.name))
        .collect()
}

/// The containers adding a capability `allowed` refuses, and those capabilities.
fn added_capabilities(pod: &Pod, allowed: impl Fn(&str) -> bool) -> (Vec<String>, Vec<String>) {
    let mut caps = BTreeSet::new();
    let containers = containers_where(pod, |c| {
        let added = c
            .security()
            .and_then(|s| s.capabilities.as_ref())
            .map(|caps| caps.add.as_slice())
            .unwrap_or_default();
        let mut bad = false;
        for cap in added.iter().filter(|cap| !allowed(cap)) {
            caps.insert(cap.clone());
            bad = true;
        }
        bad
    });
    (containers, caps.into_iter().collect())
}

/// `setters` (pod, containers, annotations) `what`, or nothing when none broke the rule.
fn violation(reason: &'static str, setters: Vec<String>, what: &str) -> Option<Violation> {
    (!setters.is_empty()).then(|| Violation {
        reason,
        detail: format!("{} {what}", setters.join(" and ")),
    })
}

fn quoted<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|i| format!("{:?}", i.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(noun: &str, n: usize) -> String {
    if n == 1 {
        noun.to_owned()
    } else {
        format!("{noun}s")
    }
}

fn plural_verb(verb: &str, n: usize) -> String {
    if n == 1 {
        format!("{verb}s")
    } else {
        verb.to_owned()
    }
}

#[cfg(test)]
mod tests;
