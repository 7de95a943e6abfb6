//! `ambit-cni`: executed by the container runtime with `CNI_COMMAND` etc. in the environment
//! and the network config on stdin; prints the result (or CNI's error object) on stdout.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use ambit_cni::spec::{code, CniError, Env};

fn main() -> ExitCode {
    let env = Env::from_vars(std::env::vars());
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().take(16 << 20).read_to_end(&mut stdin) {
        Ok(_) => ambit_cni::plugin::run(&env, &stdin),
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            "cannot read the network config on stdin",
            e.to_string(),
        )),
    };
    let (json, exit) = match outcome {
        Ok(Some(result)) => (Some(result.to_string()), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("ambit-cni: {e}");
            let json = serde_json::to_string(&e).unwrap_or_else(|_| {
                format!(
                    r#"{{"cniVersion":"1.0.0","code":{},"msg":"ambit-cni failed"}}"#,
                    e.code
                )
            });
            (Some(json), ExitCode::FAILURE)
        }
    };
    if let Some(json) = json {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{json}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    exit
}
