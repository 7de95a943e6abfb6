//! Validation against the Kubernetes OpenAPI schemas, with unknown fields refused: PyPI's
//! `kubernetes-validate` ships the official schemas (as JSON Schema) of every Kubernetes version.
//! It is installed on first use, pinned with its dependencies, into a venv under the target
//! directory, and reused while the pins are unchanged.

use std::{
    fs::{self, File, OpenOptions},
    io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use xtask::cmd;

/// Exact pins, so that a new release of any of them cannot change what CI accepts. A change here
/// reinstalls the venv.
const REQUIREMENTS: [&str; 10] = [
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];

/// The versions validated against. 1.32: the machine's kubectl (whose kustomize renders deploy/)
/// and the oldest minor still in providers' extended support; older would not know
/// `appArmorProfile` anyway (1.30). 1.37: the newest the pinned package knows, which catches a
/// field removed since.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.32.0", "1.37.0"];

/// The pinned validator's own version, for the summary.
pub fn validator() -> &'static str {
    REQUIREMENTS[0]
}

/// What the validator said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// (object, version) pairs that passed.
    pub passed: usize,
    pub problems: Vec<String>,
}

/// Validates every object of the multi-document YAML file `rendered` (holding `objects` objects)
/// against each of [`KUBERNETES_VERSIONS`].
pub fn validate(venv: &Path, rendered: &Path, objects: usize) -> Result<Outcome> {
    let exe = ensure_venv(venv)?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--strict");
    for version in KUBERNETES_VERSIONS {
        cmd.args(["-k", version]);
    }
    cmd.arg(rendered);
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok(parse(
        &stdout,
        &stderr,
        out.status.success(),
        objects * KUBERNETES_VERSIONS.len(),
    ))
}

/// Reads the validator's report. It prints `INFO ... passed`, `ERROR`/`FATAL` for a failure, and
/// `WARN` when it has no schema for a kind (a custom resource): that is a failure too, since such
/// an object would pass unvalidated. A run that passed fewer than `expected` pairs failed.
pub fn parse(stdout: &str, stderr: &str, success: bool, expected: usize) -> Outcome {
    let mut outcome = Outcome::default();
    for line in stdout.lines() {
        if line.starts_with("INFO ") && line.contains(" passed for resource ") {
            outcome.passed += 1;
        } else if ["ERROR ", "FATAL ", "WARN "]
            .iter()
            .any(|p| line.starts_with(p))
        {
            outcome.problems.push(line.to_owned());
        }
    }
    if !success && outcome.problems.is_empty() {
        outcome.problems.push(format!(
            "kubernetes-validate failed without naming an object: {}",
            stderr.trim()
        ));
    }
    if outcome.passed != expected && outcome.problems.is_empty() {
        outcome.problems.push(format!(
            "kubernetes-validate passed {} object-version pairs of {expected}",
            outcome.passed
        ));
    }
    outcome
}

/// The venv's `kubernetes-validate`, installing it first if the venv is missing or its pins differ.
fn ensure_venv(venv: &Path) -> Result<PathBuf> {
    let exe = venv.join("bin").join("kubernetes-validate");
    let stamp = venv.join("ambit-requirements.txt");
    let wanted = REQUIREMENTS.join("\n") + "\n";
    let _lock = lock(venv)?;
    if exe.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(exe);
    }
    eprintln!(
        "[xtask] installing {} into {} (first use, or its pins changed)",
        validator(),
        venv.display()
    );
    let python = "python3";
    match Command::new(python).arg("--version").output() {
        Err(err) if err.kind() == io::ErrorKind::NotFound => bail!(
            "python3 not found: check-deploy validates the manifests with PyPI's \
             kubernetes-validate in a venv. Install python3 with its venv module \
             (Debian: apt-get install python3-venv)"
        ),
        Err(err) => return Err(err).context("failed to run python3"),
        Ok(_) => {}
    }
    cmd::run(
        Command::new(python)
            .args(["-m", "venv", "--clear"])
            .arg(venv),
    )
    .context("failed to create the venv (Debian needs the python3-venv package)")?;
    cmd::run(
        Command::new(venv.join("bin").join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
            ])
            .args(REQUIREMENTS),
    )
    .context("failed to install kubernetes-validate from PyPI")?;
    if !exe.is_file() {
        bail!(
            "pip installed kubernetes-validate but {} is missing",
            exe.display()
        );
    }
    fs::write(&stamp, wanted).with_context(|| format!("failed to write {}", stamp.display()))?;
    Ok(exe)
}

/// Two checks at once (the developer's and CI's) take turns installing; the kernel drops the
/// lock with its holder, so it never goes stale.
fn lock(venv: &Path) -> Result<File> {
    let path = venv.with_extension("lock");
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    file.lock()
        .with_context(|| format!("failed to lock {}", path.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSED: &str = "INFO x.yaml passed for resource namespace/ambit-system against version 1.32\n\
                          INFO x.yaml passed for resource namespace/ambit-system against version 1.37\n";

    #[test]
    fn all_pairs_passing_is_a_pass() {
        assert_eq!(
            parse(PASSED, "", true, 2),
            Outcome {
                passed: 2,
                problems: vec![]
            }
        );
    }

    #[test]
    fn an_unknown_field_fails() {
        let out = "INFO x.yaml passed for resource namespace/a against version 1.32\n\
                   ERROR x.yaml did not validate for resource daemonset/a against version 1.32: \
                   spec.template.spec: Additional properties are not allowed ('bogus' was unexpected)\n";
        let outcome = parse(out, "", false, 2);
        assert_eq!(outcome.passed, 1);
        assert_eq!(outcome.problems.len(), 1);
        assert!(outcome.problems[0].contains("'bogus' was unexpected"));
    }

    #[test]
    fn a_kind_without_schema_fails() {
        // kubernetes-validate exits 0 here: the object would otherwise pass unvalidated.
        let out = "WARN x.yaml Couldn't find schema for kind VirtualService with api version \
                   networking.istio.io/v1 for kubernetes version 1.32\n";
        let outcome = parse(out, "", true, 1);
        assert_eq!(outcome.problems.len(), 1, "{outcome:?}");
    }

    #[test]
    fn fewer_passes_than_objects_fails() {
        let outcome = parse(PASSED, "", true, 4);
        assert_eq!(
            outcome.problems,
            ["kubernetes-validate passed 2 object-version pairs of 4"]
        );
    }

    #[test]
    fn a_silent_failure_fails() {
        let outcome = parse("", "Traceback: boom", false, 0);
        assert_eq!(outcome.problems.len(), 1);
        assert!(outcome.problems[0].contains("Traceback: boom"));
    }
}
