//! Bad input in the config directory of a running agent: directory symlinks to the directory
//! itself, a symlink loop, a 100,000-level nested document and a 50 MB file. None may stall the
//! agent: a good pod beside it is enrolled, and one added later is enrolled too. `ambit check -f`
//! terminates on each with a message naming the file.

mod support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ambit::harness::{ClusterYaml, LocalAgent, World};
use support::ambit_bin;

/// What `ambit check -f` printed, and whether it succeeded.
struct Checked {
    success: bool,
    stdout: String,
}

/// Starts an agent on a config dir holding `bad` (written by the closure) beside a good
/// `cluster.yaml`, waits for its pod, then adds a second pod and waits for it: config processing
/// goes on with the bad input in place. Returns what the last status reports as config errors
/// and what `ambit check -f` says about the same directory.
fn agent_copes_with(test: &str, bad: impl FnOnce(&Path)) -> (Vec<String>, Checked) {
    let world = World::new(test);
    let n1 = world.node("n1");
    let first = world.pod("first").node(&n1).namespace("mesh").spawn();
    let second = world.pod("second").node(&n1).namespace("mesh").spawn();
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    let dir = agent.config_dir();
    bad(&dir);
    ClusterYaml::new().ambient("mesh").pod(&first).write(&dir);
    agent.start(&world);
    agent.wait_enrolled(&[&first]);

    ClusterYaml::new()
        .ambient("mesh")
        .pods([&first, &second])
        .write(&dir);
    let status = agent.wait_enrolled(&[&first, &second]);
    let errors = status["config_errors"]
        .as_array()
        .expect("config_errors in status")
        .iter()
        .filter_map(|e| e.as_str().map(String::from))
        .collect();

    // `ambit check` on the same directory, with a ceiling instead of a hang.
    let out = agent.log_path().with_file_name("check.out");
    let file = std::fs::File::create(&out).expect("create check output");
    let check = world.spawn(
        Command::new(ambit_bin())
            .args(["check", "-f"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null()),
    );
    let status = check
        .wait_timeout(Duration::from_secs(60))
        .expect("wait for ambit check")
        .unwrap_or_else(|| {
            check.kill();
            panic!("ambit check -f {} did not finish in 60 s", dir.display())
        });
    let stdout = std::fs::read_to_string(&out).expect("read check output");
    (
        errors,
        Checked {
            success: status.success(),
            stdout,
        },
    )
}

fn namespace_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
}

#[test]
fn two_directory_symlinks_to_the_config_dir_stall_nothing() {
    let (errors, check) = agent_copes_with("bad-selflinks", |dir| {
        std::fs::create_dir_all(dir).expect("config dir");
        symlink(".", dir.join("l1")).expect("symlink l1 -> .");
        symlink(".", dir.join("l2")).expect("symlink l2 -> .");
    });
    assert_eq!(errors, Vec::<String>::new(), "a loop is not a problem");
    assert!(check.success, "{}", check.stdout);
    assert!(check.stdout.contains("no problems"), "{}", check.stdout);
}

#[test]
fn a_symlink_loop_in_the_config_dir_stalls_nothing() {
    let (errors, check) = agent_copes_with("bad-loop", |dir| {
        std::fs::create_dir_all(dir.join("a")).expect("config dir");
        std::fs::write(dir.join("a/extra.yaml"), namespace_yaml("extra")).expect("write");
        symlink("..", dir.join("a/b")).expect("symlink a/b -> ..");
    });
    assert_eq!(errors, Vec::<String>::new(), "a loop is not a problem");
    assert!(check.success, "{}", check.stdout);
    assert!(check.stdout.contains("no problems"), "{}", check.stdout);
}

#[test]
fn a_100000_level_nested_document_stalls_nothing() {
    let (errors, check) = agent_copes_with("bad-deep", |dir| {
        std::fs::create_dir_all(dir).expect("config dir");
        let n = 100_000;
        let deep = format!("{}1{}\n", "{a: ".repeat(n), "}".repeat(n));
        std::fs::write(dir.join("deep.yaml"), deep).expect("write");
    });
    let want = "deep.yaml: document 1: nested deeper than 64 levels at line 1 column 257";
    assert!(errors.iter().any(|e| e.contains(want)), "{errors:?}");
    assert!(!check.success, "{}", check.stdout);
    assert!(check.stdout.contains(want), "{}", check.stdout);
}

#[test]
fn a_50_mb_file_stalls_nothing() {
    let (errors, check) = agent_copes_with("bad-large", |dir| {
        std::fs::create_dir_all(dir).expect("config dir");
        // Real bytes (YAML comments), not a sparse file: what a careless copy would leave.
        let line = format!("# {}\n", "x".repeat(98));
        let mut text = line.repeat(50_000_000 / line.len());
        text.push_str(&"#".repeat(50_000_000 - text.len()));
        std::fs::write(dir.join("big.yaml"), text).expect("write 50 MB");
    });
    let want = "big.yaml: 50000000 bytes, over the limit of 16 MiB for a config file; not read";
    assert!(errors.iter().any(|e| e.contains(want)), "{errors:?}");
    assert!(!check.success, "{}", check.stdout);
    assert!(check.stdout.contains(want), "{}", check.stdout);
}
