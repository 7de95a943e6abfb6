//! Running helper programs (`ip`, `sh`) and turning their failures into errors that show the command
//! line and its stderr.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use super::HarnessError;

/// Runs `cmd` to completion; returns its stdout, or an error with the command line and stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, HarnessError> {
    let command = show(cmd);
    tracing::debug!(%command, "harness: run");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HarnessError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>` in the caller's netns (used for `ip netns add/del`).
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String, HarnessError> {
    run(Command::new("ip").args(args))
}

/// `ip -n <netns> <args>`: iproute2 enters the netns itself, only for its own process.
pub(crate) fn ip_in<S: AsRef<OsStr>>(netns: &str, args: &[S]) -> Result<String, HarnessError> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// The command line as a human would type it (no quoting; for messages only).
pub(crate) fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}
