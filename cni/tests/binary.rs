//! The `ambit-cni` binary as a runtime executes it: what it prints on stdout and how it exits.
//! The library's decisions have unit tests; these check `main`'s side of CNI's process protocol
//! (a result or an error object on stdout, and the exit status that goes with it).
//!
//! Being an integration test of this package, it also makes `cargo test --workspace` build the
//! plugin binary with the workspace's features: tests/cni.rs then finds it built.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use ambit_cni::spec::{code, SUPPORTED_VERSIONS};
use serde_json::Value;

/// Runs the plugin with `env` (and nothing else of ours) and `stdin`.
fn exec(env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ambit-cni");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("write the config");
    child.wait_with_output().expect("ambit-cni's output")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {:?}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn version_prints_the_supported_versions_and_exits_zero() {
    let out = exec(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
    assert!(out.status.success(), "{:?}", out.status);
    let json = stdout_json(&out);
    assert_eq!(
        json["cniVersion"], "0.4.0",
        "the version the runtime asked in"
    );
    assert_eq!(
        json["supportedVersions"],
        serde_json::json!(SUPPORTED_VERSIONS)
    );
}

#[test]
fn a_failure_is_an_error_object_on_stdout_and_a_non_zero_exit() {
    // Executed by hand: no CNI_COMMAND.
    let out = exec(&[], "");
    assert!(!out.status.success(), "{:?}", out.status);
    let json = stdout_json(&out);
    assert_eq!(json["code"], code::INVALID_ENV, "{json}");
    assert!(
        json["msg"].as_str().unwrap_or("").contains("CNI_COMMAND"),
        "{json}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CNI_COMMAND"),
        "and a line on stderr for whoever runs it by hand"
    );

    // An ADD whose config is not JSON: decoding's code, in the spec's default version.
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/none"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    let out = exec(&env, "{not json");
    assert!(!out.status.success(), "{:?}", out.status);
    let json = stdout_json(&out);
    assert_eq!(json["code"], code::DECODE, "{json}");
    assert_eq!(json["cniVersion"], "1.0.0", "{json}");

    // A version it does not speak: incompatible, and the details name it.
    let out = exec(
        &env,
        r#"{"cniVersion":"9.9.9","name":"k8s","type":"ambit-cni"}"#,
    );
    assert!(!out.status.success(), "{:?}", out.status);
    let json = stdout_json(&out);
    assert_eq!(json["code"], code::INCOMPATIBLE_VERSION, "{json}");
    assert!(
        json["details"].as_str().unwrap_or("").contains("9.9.9"),
        "{json}"
    );
}
