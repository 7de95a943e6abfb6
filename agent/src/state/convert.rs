//! Parsed objects → state items: the one validated path both sources go through. Keeps only the
//! fields ambit uses. A fatal problem rejects the object (its last good version stays); a problem
//! with an optional feature (a bad port-exclusion annotation) is a warning and the object is used
//! without that feature.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    key, Endpoint, EndpointSlice, Namespace, Service, ServicePort, SlicePort, TargetPort, Workload,
};
use crate::config::{
    Object, ObjectError, ObjectRef, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS, NETNS_ANNOTATION,
};

/// A state item built from one object.
#[derive(Debug, Clone)]
pub enum Item {
    Namespace(Namespace),
    Workload(Workload),
    Service(Service),
    Slice(EndpointSlice),
    /// Istio objects are validated when parsed (`config::istio`); the state keeps them whole.
    Istio(std::sync::Arc<crate::config::istio::IstioConfig>),
}

/// A converted object and the non-fatal problems found in it.
#[derive(Debug)]
pub struct Converted {
    pub item: Item,
    pub warnings: Vec<ObjectError>,
}

/// The annotations a workload keeps.
const KEPT_ANNOTATIONS: [&str; 6] = [
    NETNS_ANNOTATION,
    crate::state::SIDECAR_STATUS_ANNOTATION,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    "ambit.dev/destination-l7",
    "ambit.dev/original-source",
];

pub fn convert(obj: &Object, domain: &str) -> Result<Converted, Vec<ObjectError>> {
    let oref = obj.object_ref();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let item = match obj {
        Object::Namespace(ns) => Item::Namespace(Namespace {
            name: oref.name.clone(),
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        }),
        Object::Pod(pod) => Item::Workload(workload(&oref, pod, &mut errors, &mut warnings)),
        Object::Service(svc) => Item::Service(service(&oref, svc, domain, &mut errors)),
        Object::Istio(config) => Item::Istio(std::sync::Arc::new(config.clone())),
        Object::EndpointSlice(slice) => Item::Slice(endpoint_slice(&oref, slice, &mut errors)?),
    };
    if errors.is_empty() {
        Ok(Converted { item, warnings })
    } else {
        Err(errors)
    }
}

fn workload(
    oref: &ObjectRef,
    pod: &k8s_openapi::api::core::v1::Pod,
    errors: &mut Vec<ObjectError>,
    warnings: &mut Vec<ObjectError>,
) -> Workload {
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let mut ips = Vec::new();
    let listed = status
        .pod_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.clone()));
    let fields = status
        .pod_ip
        .iter()
        .map(|s| ("status.podIP".to_string(), s.clone()))
        .chain(listed);
    collect_ips(oref, fields, "is not an IP address", &mut ips, errors);
    let mut named_ports = BTreeMap::new();
    for (ci, c) in spec.containers.iter().enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}].containerPort");
            match port_number(p.container_port) {
                Some(n) => {
                    if let Some(name) = &p.name {
                        named_ports.insert(name.clone(), n);
                    }
                }
                None => errors.push(ObjectError::new(
                    oref,
                    field,
                    format!("{} is not a port (1-65535)", p.container_port),
                )),
            }
        }
    }
    let annotations: BTreeMap<String, String> = pod
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| KEPT_ANNOTATIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for a in [EXCLUDE_OUTBOUND_PORTS, EXCLUDE_INBOUND_PORTS] {
        if let Err(bad) = parse_port_list(annotations.get(a).map(String::as_str).unwrap_or("")) {
            warnings.push(ObjectError::new(
                oref,
                format!("metadata.annotations[{a}]"),
                format!("{bad:?} is not a port (1-65535); this exclusion is ignored"),
            ));
        }
    }
    let phase = status.phase.as_deref().unwrap_or("Running");
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let service_account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let istio = std::sync::Arc::new(crate::state::IstioLabels::new(
        &workload_name(&pod.metadata, &labels),
        &oref.namespace,
        &service_account,
        &labels,
    ));
    Workload {
        uid: pod
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", oref.namespace, oref.name)),
        name: oref.name.clone(),
        namespace: oref.namespace.clone(),
        service_account,
        node: spec.node_name.clone(),
        host_network: spec.host_network.unwrap_or(false),
        ips,
        labels,
        named_ports,
        annotations,
        running: !matches!(phase, "Succeeded" | "Failed"),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        istio,
    }
}

fn service(
    oref: &ObjectRef,
    svc: &k8s_openapi::api::core::v1::Service,
    domain: &str,
    errors: &mut Vec<ObjectError>,
) -> Service {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut vips = Vec::new();
    let mut headless = false;
    let listed = spec
        .cluster_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, s)| (format!("spec.clusterIPs[{i}]"), s.clone()));
    let fields = spec
        .cluster_ip
        .iter()
        .map(|s| ("spec.clusterIP".to_string(), s.clone()))
        .chain(listed);
    // "None" marks a headless Service; an empty value means "not allocated yet".
    let fields = fields.filter(|(_, s)| {
        headless |= s == "None";
        s != "None" && !s.is_empty()
    });
    collect_ips(
        oref,
        fields,
        "is not an IP address or \"None\"",
        &mut vips,
        errors,
    );
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let Some(port) = port_number(p.port) else {
            errors.push(ObjectError::new(
                oref,
                format!("spec.ports[{i}].port"),
                format!("{} is not a port (1-65535)", p.port),
            ));
            continue;
        };
        // A numeric string is a number too (Kubernetes accepts both forms).
        let numeric = match &p.target_port {
            None => Some(i32::from(port)),
            Some(IntOrString::Int(n)) => Some(*n),
            Some(IntOrString::String(s)) => s.parse::<i32>().ok(),
        };
        let target_port = match (numeric, &p.target_port) {
            (Some(n), _) => match port_number(n) {
                Some(n) => TargetPort::Number(n),
                None => {
                    errors.push(ObjectError::new(
                        oref,
                        format!("spec.ports[{i}].targetPort"),
                        format!("{n} is not a port (1-65535)"),
                    ));
                    continue;
                }
            },
            (None, Some(IntOrString::String(name))) => TargetPort::Named(name.clone()),
            (None, _) => TargetPort::Number(port),
        };
        ports.push(ServicePort {
            name: p.name.clone(),
            port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            app_protocol: p.app_protocol.clone(),
            target_port,
        });
    }
    Service {
        name: oref.name.clone(),
        namespace: oref.namespace.clone(),
        hostname: format!("{}.{}.svc.{domain}", oref.name, oref.namespace),
        vips,
        headless,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
    }
}

fn endpoint_slice(
    oref: &ObjectRef,
    slice: &k8s_openapi::api::discovery::v1::EndpointSlice,
    errors: &mut Vec<ObjectError>,
) -> Result<EndpointSlice, Vec<ObjectError>> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .cloned();
    let Some(service) = service else {
        return Err(vec![ObjectError::new(
            oref,
            "metadata.labels[kubernetes.io/service-name]",
            "required: names the owning Service",
        )]);
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        match p.port.and_then(port_number) {
            Some(port) => ports.push(SlicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            }),
            None => errors.push(ObjectError::new(
                oref,
                format!("ports[{i}].port"),
                format!("{:?} is not a port (1-65535)", p.port),
            )),
        }
    }
    let mut endpoints = Vec::new();
    // FQDN slices name hosts, not addresses: nothing to index by IP.
    if slice.address_type != "FQDN" {
        for (i, e) in slice.endpoints.iter().flatten().enumerate() {
            let pod = e
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
                .map(|t| {
                    key(
                        t.namespace.as_deref().unwrap_or(&oref.namespace),
                        t.name.as_deref().unwrap_or_default(),
                    )
                });
            for (j, a) in e.addresses.iter().enumerate() {
                match a.parse::<IpAddr>() {
                    Ok(ip) => endpoints.push(Endpoint {
                        ip,
                        // Kubernetes: a nil ready condition means ready.
                        ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                        pod: pod.clone(),
                        node: e.node_name.clone(),
                    }),
                    Err(_) => errors.push(ObjectError::new(
                        oref,
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an IP address"),
                    )),
                }
            }
        }
    }
    Ok(EndpointSlice {
        name: oref.name.clone(),
        namespace: oref.namespace.clone(),
        service,
        ports,
        endpoints,
    })
}

/// Istio's workload name for a pod (istio `GetDeployMetaFromPod`): a ReplicaSet owner is its
/// Deployment (the name without `-<pod-template-hash>`), a Job named `<cronjob>-<digits>` its
/// CronJob, any other controller itself; a pod without one is its own workload.
fn workload_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    labels: &BTreeMap<String, String>,
) -> String {
    let pod_name = meta.name.clone().unwrap_or_default();
    let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return pod_name;
    };
    match owner.kind.as_str() {
        "ReplicaSet" => labels
            .get("pod-template-hash")
            .and_then(|hash| owner.name.strip_suffix(&format!("-{hash}")))
            .unwrap_or(&owner.name)
            .to_string(),
        "Job" => match owner.name.rsplit_once('-') {
            Some((cronjob, stamp))
                if !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cronjob.to_string()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
}

/// Parses (field, value) pairs into distinct addresses, reporting each bad value at its field.
fn collect_ips(
    oref: &ObjectRef,
    fields: impl Iterator<Item = (String, String)>,
    problem: &str,
    ips: &mut Vec<IpAddr>,
    errors: &mut Vec<ObjectError>,
) {
    for (field, s) in fields {
        match s.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => errors.push(ObjectError::new(oref, field, format!("{s:?} {problem}"))),
        }
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p > 0)
}

/// `"9000, 9001"` → ports; the first bad element on error.
pub fn parse_port_list(s: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u16>() {
            Ok(p) if p > 0 => out.push(p),
            _ => return Err(part.to_string()),
        }
    }
    Ok(out)
}

/// The object a state item came from (for Replace bookkeeping).
pub fn item_ref(item: &Item) -> ObjectRef {
    use crate::config::Kind;
    match item {
        Item::Namespace(n) => ObjectRef::new(Kind::Namespace, "", n.name.clone()),
        Item::Workload(w) => ObjectRef::new(Kind::Pod, w.namespace.clone(), w.name.clone()),
        Item::Service(s) => ObjectRef::new(Kind::Service, s.namespace.clone(), s.name.clone()),
        Item::Slice(s) => ObjectRef::new(Kind::EndpointSlice, s.namespace.clone(), s.name.clone()),
        Item::Istio(c) => ObjectRef::new(
            crate::config::object::istio_kind(c.kind()),
            c.metadata()
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            c.metadata().name.clone().unwrap_or_default(),
        ),
    }
}
