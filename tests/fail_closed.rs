//! Fail closed through every gap (issue 9), local mode (the file source), on real namespaces and
//! eBPF: an agent restarted while its config cannot be read keeps adopted pods captured and
//! refusing, then serves them without a flap; a pod whose netns appears late is enrolled without
//! any config change; a terminating pod stays enrolled until its sandbox exits; every problem is
//! logged once and the status always equals /metrics. The same gaps against the Kubernetes API
//! are in `fail_closed_kube.rs`.

mod support;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, LocalAgent, World};
use support::{ambit_bin, attached_links, in_pod, our_map_ids, wait_until, whoami, Mode, Server};

/// Ceiling for waits: generous, because other jobs may hold both cores; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Log lines written after byte `from` of the agent's log.
fn log_since(agent: &LocalAgent, from: usize) -> Vec<String> {
    let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn log_len(agent: &LocalAgent) -> usize {
    std::fs::metadata(agent.log_path()).map_or(0, |m| m.len() as usize)
}

/// The (kind, namespace, name, field) of every `ambit_config_rejected_objects` series.
fn rejected_series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("ambit_config_rejected_objects{"))
        .map(|l| {
            l.rsplit_once(' ')
                .map_or(l, |(labels, _)| labels)
                .to_string()
        })
        .collect()
}

/// The same, from the status file's structured problems.
fn rejected_in_status(status: &serde_json::Value) -> BTreeSet<String> {
    status["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["about"] == "object")
        .map(|p| {
            format!(
                "ambit_config_rejected_objects{{kind=\"{}\",namespace=\"{}\",name=\"{}\",field=\"{}\"}}",
                p["kind"].as_str().unwrap_or_default(),
                p["namespace"].as_str().unwrap_or_default(),
                p["name"].as_str().unwrap_or_default(),
                p["field"].as_str().unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn a_restart_while_the_config_is_unreadable_keeps_adopted_pods_closed_and_does_not_flap() {
    let world = World::new("fc-files");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let echo = sa(server.ip4(), 8080);
    let srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .pods([&client, &server])
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server]);
    in_pod(&client, || whoami(echo)).expect("captured traffic works");
    // The server records a connection when it closes: wait for this one, so that the count
    // taken below is not overtaken by it.
    wait_until("the server recorded the first connection", || {
        srv.count() == 1
    });
    let maps = our_map_ids(agent.bpffs());
    let links = attached_links(&maps);
    assert_eq!(links.get("netns"), Some(&2), "one sk_lookup link per pod");

    // The agent dies; when it comes back, its config directory cannot be read.
    agent.kill();
    let dir = agent.config_dir();
    let away = dir.with_extension("away");
    std::fs::rename(&dir, &away).expect("hide the config");
    let mark = log_len(&agent);
    agent.start(&world);
    let status = agent.wait_for("a status saying why it is not ready", PATIENCE, |s| {
        s["ready"] == false
            && s["readiness"]
                .as_str()
                .is_some_and(|r| r.contains("config path"))
    });
    assert_eq!(status["pods"], serde_json::json!([]), "nothing enrolled");
    let (head, body) = agent.http_get("/healthz/ready");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        body.contains("waiting for the first complete list") && body.contains("config path"),
        "readiness explains itself: {body}"
    );
    let (head, _) = agent.http_get("/healthz/live");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "live while waiting: {head}"
    );

    // 30 s with the source unavailable: adopted pods stay captured and refuse; nothing is pruned.
    let served = srv.count();
    let until = Instant::now() + Duration::from_secs(30);
    let mut tries = 0;
    while Instant::now() < until {
        let e = client
            .run(move || TcpStream::connect_timeout(&echo, Duration::from_secs(2)))
            .expect_err("an adopted pod must not connect around the mesh");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e:?}");
        assert_eq!(attached_links(&maps), links, "capture stays attached");
        tries += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(tries >= 10, "checked throughout: {tries}");
    assert_eq!(srv.count(), served, "nothing reached the app");
    let status = agent.fresh_status();
    assert_eq!(
        status["maps"]["AMBIT_ENROLLED"], 2,
        "no adopted pod pruned: {status}"
    );
    assert_eq!(status["netns_links"].as_array().map(Vec::len), Some(2));

    // The source returns: served normally, and nothing flapped.
    std::fs::rename(&away, &dir).expect("restore the config");
    agent.wait_enrolled(&[&client, &server]);
    agent.wait_for("ready", PATIENCE, |s| s["ready"] == true);
    let streams = agent.counter("proxy.hbone_inbound_streams");
    let (peer, local, _) = in_pod(&client, || whoami(echo))
        .unwrap_or_else(|e| panic!("after the source returned: {e}\n{}", agent.log_tail()));
    assert_eq!(
        (peer.ip(), local),
        (IpAddr::from(client.ip4()), echo),
        "the app sees the client"
    );
    agent.wait_for("through both proxies", PATIENCE, |s| {
        s["proxy"]["hbone_inbound_streams"].as_u64() > Some(streams)
    });
    assert_eq!(attached_links(&maps), links, "no link replaced or added");
    let flaps: Vec<String> = log_since(&agent, mark)
        .into_iter()
        .filter(|l| l.contains("unenrolled") || l.contains("removing capture state"))
        .collect();
    assert!(flaps.is_empty(), "no unenrol/re-enrol: {flaps:#?}");
}

#[test]
fn a_pod_whose_netns_appears_late_is_enrolled_without_a_config_change() {
    let world = World::new("fc-late");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let echo = sa(server.ip4(), 8080);
    let _srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    // The server's netns is named by a path that does not exist yet (its sandbox has not started).
    let late = agent.config_dir().with_file_name("server-netns");
    ClusterYaml::new()
        .ambient("mesh")
        .pods([&client, &server])
        .netns_at(&server, &late)
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client]);
    let status = agent.wait_for("the waiting pod reported", PATIENCE, |s| {
        s["config_errors"]
            .to_string()
            .contains("Pod mesh/server: cannot enrol")
    });
    let generation = status["generation"].as_u64().unwrap_or(0);
    let (_, metrics) = agent.http_get("/metrics");
    assert!(
        metrics.contains("ambit_enrolment_problems{namespace=\"mesh\",pod=\"server\"} 1"),
        "{metrics}"
    );

    std::thread::sleep(Duration::from_secs(3));
    std::os::unix::fs::symlink(server.netns_path(), &late).expect("the netns appears");
    let appeared = Instant::now();
    // No config change: only the agent's own retry can enrol it.
    let status = agent.wait_enrolled(&[&client, &server]);
    eprintln!(
        "measured: netns appeared -> pod enrolled in {:?} (issue 9 asks for under 1 s)",
        appeared.elapsed()
    );
    assert!(
        status["generation"].as_u64().unwrap_or(0) > generation,
        "enrolled by a retry"
    );
    let streams = agent.counter("proxy.hbone_inbound_streams");
    let (peer, _, _) = in_pod(&client, || whoami(echo)).expect("captured");
    assert_eq!(
        peer.ip(),
        IpAddr::from(client.ip4()),
        "the app sees the client"
    );
    agent.wait_for("through the proxies", PATIENCE, |s| {
        s["proxy"]["hbone_inbound_streams"].as_u64() > Some(streams)
    });
    agent.wait_for("the problem cleared", PATIENCE, |s| {
        s["config_errors"].as_array().is_some_and(Vec::is_empty)
    });
    let (_, metrics) = agent.http_get("/metrics");
    assert!(!metrics.contains("ambit_enrolment_problems{"), "{metrics}");
}

#[test]
fn a_terminating_pod_stays_enrolled_until_its_sandbox_exits() {
    let world = World::new("fc-term");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let echo = sa(server.ip4(), 8080);
    let _srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    // In local mode the pod's sandbox is its netns file: this link stands for it.
    let sandbox = agent.config_dir().with_file_name("server-sandbox");
    std::os::unix::fs::symlink(server.netns_path(), &sandbox).expect("sandbox link");
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .pods([&client, &server])
        .netns_at(&server, &sandbox);
    yaml.write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server]);

    // A graceful delete: deletionTimestamp set, the sandbox still running.
    let generation = agent.fresh_status()["generation"].as_u64().unwrap_or(0);
    yaml.clone().terminating(&server).write(&agent.config_dir());
    agent.wait_for("the terminating pod seen", PATIENCE, |s| {
        s["generation"].as_u64().unwrap_or(0) > generation + 2
    });
    let status = agent.fresh_status();
    let pods = status["pods"].to_string();
    assert!(
        pods.contains("mesh/server"),
        "still enrolled while its sandbox runs: {pods}"
    );
    let streams = agent.counter("proxy.hbone_inbound_streams");
    let (peer, _, _) = in_pod(&client, || whoami(echo)).expect("traffic during shutdown");
    assert_eq!(
        peer.ip(),
        IpAddr::from(client.ip4()),
        "the app sees the client"
    );
    agent.wait_for("still meshed during shutdown", PATIENCE, |s| {
        s["proxy"]["hbone_inbound_streams"].as_u64() > Some(streams)
    });

    // The sandbox exits: unenrolled, with no config change.
    std::fs::remove_file(&sandbox).expect("sandbox gone");
    agent.wait_enrolled(&[&client]);
    assert!(
        !Path::new(&sandbox).exists(),
        "the test removed only its own link"
    );
}

#[test]
fn each_problem_is_logged_once_and_the_status_always_equals_the_metrics() {
    let world = World::new("fc-report");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    let dir = agent.config_dir();
    ClusterYaml::new().ambient("mesh").pod(&client).write(&dir);
    let bad_service = "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: mesh}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 0}]}\n";
    std::fs::write(dir.join("bad.yaml"), bad_service).expect("bad object");
    agent.start(&world);
    agent.wait_enrolled(&[&client]);

    let agree = |what: &str| {
        // A status written after the scrape reflects at least what the scrape saw, and the two are
        // computed from one list per tick: wait until a status matches the scrape.
        let (_, metrics) = agent.http_get("/metrics");
        let series = rejected_series(&metrics);
        agent.wait_for(
            &format!("{what}: status == metrics {series:?}"),
            PATIENCE,
            |s| rejected_in_status(s) == series,
        );
        series
    };
    let series = agree("one bad object");
    assert_eq!(series.len(), 1, "{series:?}");
    assert!(
        series.iter().all(|s| s.contains("name=\"bad\"")),
        "{series:?}"
    );

    // Many ticks later (50 ms each), still one WARN line for it.
    let seq = agent.fresh_status()["seq"].as_u64().unwrap_or(0);
    agent.wait_for("40 more ticks", PATIENCE, |s| {
        s["seq"].as_u64().unwrap_or(0) > seq + 40
    });
    let warned = |agent: &LocalAgent, name: &str| {
        log_since(agent, 0)
            .iter()
            .filter(|l| l.contains("WARN") && l.contains("config problem") && l.contains(name))
            .count()
    };
    assert_eq!(
        warned(&agent, "Service mesh/bad"),
        1,
        "{}",
        agent.log_tail()
    );

    // A new bad object appears in both at once.
    std::fs::write(
        dir.join("bad2.yaml"),
        bad_service.replace("name: bad,", "name: worse,"),
    )
    .expect("second bad object");
    agent.wait_for("the second problem", PATIENCE, |s| {
        s["config_errors"].to_string().contains("mesh/worse")
    });
    let series = agree("two bad objects");
    assert_eq!(series.len(), 2, "{series:?}");

    // A deleted bad object leaves both, and its clearing is logged once.
    std::fs::remove_file(dir.join("bad.yaml")).expect("delete");
    agent.wait_for("the first problem gone", PATIENCE, |s| {
        !s["config_errors"].to_string().contains("mesh/bad:")
    });
    let series = agree("one left");
    assert_eq!(series.len(), 1, "{series:?}");
    let cleared = log_since(&agent, 0)
        .iter()
        .filter(|l| l.contains("config problem cleared") && l.contains("Service mesh/bad"))
        .count();
    assert_eq!(cleared, 1, "{}", agent.log_tail());

    // A bad update of a working AuthorizationPolicy says what really happens: its workloads deny.
    let policy = |action: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: mesh}}\nspec: {{action: {action}, rules: [{{}}]}}\n")
    };
    std::fs::write(dir.join("policy.yaml"), policy("ALLOW")).expect("policy");
    agent.wait_for("the policy applied", PATIENCE, |s| {
        s["generation"].as_u64().unwrap_or(0) > 0
            && !s["config_errors"]
                .to_string()
                .contains("AuthorizationPolicy")
    });
    std::fs::write(dir.join("policy.yaml"), policy("ALOW")).expect("bad policy");
    let status = agent.wait_for("the bad policy reported", PATIENCE, |s| {
        s["config_errors"]
            .to_string()
            .contains("AuthorizationPolicy mesh/p")
    });
    let line = status["config_errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str())
        .find(|e| e.contains("AuthorizationPolicy mesh/p"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("fail closed") && line.contains("deny every connection"),
        "{line}"
    );
    assert!(!line.contains("last good"), "{line}");
    assert_eq!(warned(&agent, "AuthorizationPolicy mesh/p"), 1);
    agree("with the policy");
}
