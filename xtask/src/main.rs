//! `cargo xtask`: the commands README's "Build and test" gives. `test` is what CI runs (.ci/run).

mod bench_compare;
mod deploy;
mod image;

use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use xtask::{cmd, ebpf, toolchain, workspace_root};

/// Debian packages the tests and the demo drive (`ip netns`, iptables, the Prometheus that
/// scrapes the agents in tests/prometheus.rs) or that help inspect them.
const DEBIAN_TOOLS: [&str; 11] = [
    "bpftool",
    // `kill`: a failed or interrupted `cargo xtask test` stops the image prebuild's process group
    // with it, and the containerd harness its daemon.
    "procps",
    "tcpdump",
    "iptables",
    "iproute2",
    "prometheus",
    // The containerd harness (xtask::containerd) and the CNI tests.
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "umoci",
];

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "ambit's build, test and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (installing the toolchain it needs) and print its path.
    BuildEbpf {
        /// Directory to copy the object into [default: target/ebpf].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run every check and test: rustfmt, check-deploy, then `cargo test`, whose build clippy lints
    /// (warnings denied). Needs root.
    ///
    /// Installs what is missing first: the Debian tools, the nightly toolchain's rust-src and
    /// bpf-linker. Arguments are passed on to `cargo test`, e.g. `cargo xtask test -- --nocapture`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Check that a Kubernetes API server would accept deploy/ and admit its pods.
    ///
    /// Renders the kustomization with `kubectl kustomize`, validates every object against the
    /// Kubernetes OpenAPI schemas (unknown fields refused; PyPI's kubernetes-validate, installed into
    /// target/xtask-venv on first use), checks each pod template against its namespace's Pod
    /// Security level and the API server's rules no schema states.
    CheckDeploy {
        /// The kustomization directory [default: deploy/].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build the static binaries and the agent's OCI image, as a tarball `ctr image import` takes.
    ///
    /// Every binary target of the workspace (except xtask's) is built in release mode, fully
    /// static (`-C target-feature=+crt-static` for the host's target), checked to need no loader
    /// and no shared library, and put under /usr/local/bin of an image with no base layer, whose
    /// entrypoint is `ambit`. Assembled with umoci; reproducible (SOURCE_DATE_EPOCH, else the last
    /// commit's time). Method and size: deploy/README.md.
    Image {
        /// A binary target to include (repeatable) [default: every one in the workspace].
        #[arg(long = "bin", value_name = "NAME")]
        bins: Vec<String>,
        /// The image tarball (OCI image layout) [default: target/image/ambit-image.tar].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The image's name and tag, as `ctr image import` records it.
        #[arg(long, default_value = image::DEFAULT_REFERENCE)]
        reference: String,
        /// Only build the static binaries and copy them into DIR (the Dockerfile's build stage).
        #[arg(long, value_name = "DIR")]
        binaries_only: Option<PathBuf>,
        /// The cargo profile the binaries are built with. `image-test` (Cargo.toml) is the one
        /// `cargo xtask test` builds and runs: the same code and checks, built faster.
        #[arg(long, default_value = "release")]
        profile: String,
    },
    /// Compare the capture and hbone benches of a base revision with the current tree. Needs root.
    ///
    /// Builds both (the base in a scratch worktree under target/bench-base, removed after its
    /// build), runs them alternately (base, current, current, base, ...) and prints, per bench,
    /// path and figure, the medians of both sides and current/base, flagging ratios worse than
    /// 0.97. AMBIT_BENCH_* variables apply to both sides. Method: agent/benches/README.md.
    BenchCompare {
        /// The git revision to compare against, e.g. a commit before the change.
        #[arg(long)]
        base: String,
        /// The benches to run, comma-separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "capture,hbone"
        )]
        bench: Vec<bench_compare::Bench>,
        /// Rounds; each runs every bench once per side, the side that goes first alternating (an
        /// even number balances the order).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// KEY=VALUE for the current build's runs only (repeatable), e.g. agent flags the base
        /// lacks: --current-env 'AMBIT_BENCH_WARM_ARGS=--some-flag'.
        #[arg(long = "current-env", value_name = "KEY=VALUE", value_parser = key_value)]
        current_env: Vec<(String, String)>,
        /// Delete the base build (target/bench-base) when done; by default it is kept, so the next
        /// comparison against the same base rebuilds only ambit's own crates.
        #[arg(long)]
        clean: bool,
    },
    /// Build the agent and run its local demo (`ambit demo`). Needs root.
    ///
    /// Arguments are passed on to `ambit demo`; `cargo xtask demo -- --help` lists its options.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    match run(parse(env::args_os().collect())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("[xtask] error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::BuildEbpf { out } => {
            let out = out.unwrap_or_else(ebpf::target_dir);
            println!("{}", ebpf::build_ebpf(&out)?.display());
            Ok(())
        }
        Task::Test { args } => test(args),
        Task::CheckDeploy { dir } => deploy::check(&dir.unwrap_or_else(deploy::default_dir)),
        Task::Demo { args } => demo(args),
        Task::Image {
            bins,
            out,
            reference,
            binaries_only,
            profile,
        } => image::run(image::Options {
            bins,
            out,
            reference,
            binaries_only,
            profile,
        }),
        Task::BenchCompare {
            base,
            bench,
            rounds,
            current_env,
            clean,
        } => {
            if !is_root()? {
                bail!(
                    "bench-compare needs root: the benches create network namespaces and load eBPF"
                );
            }
            bench_compare::run(bench_compare::Options {
                base,
                benches: bench,
                rounds,
                current_env,
                clean,
            })
        }
    }
}

/// `KEY=VALUE` of `--current-env`.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Parses the command line, keeping pass-through arguments verbatim: clap would drop a leading
/// `--`, which `cargo xtask test -- --nocapture` needs.
fn parse(argv: Vec<OsString>) -> Task {
    let mut task = Cli::parse_from(&argv).task;
    // No options come before the task, so argv is [program, task, pass-through...].
    let passed = argv.into_iter().skip(2);
    match &mut task {
        Task::Test { args } => *args = passed.collect(),
        // `ambit demo` gets no `--` of its own: `cargo xtask demo -- --help` asks it for help.
        Task::Demo { args } => *args = passed.skip_while(|arg| arg == "--").collect(),
        Task::BuildEbpf { .. }
        | Task::CheckDeploy { .. }
        | Task::Image { .. }
        | Task::BenchCompare { .. } => {}
    }
    task
}

fn test(args: Vec<OsString>) -> Result<()> {
    let started = Instant::now();
    if !is_root()? {
        eprintln!(
            "[xtask] warning: not root; the tests that create namespaces and load eBPF need root"
        );
    }
    ensure_debian_tools()?;
    ensure_rustfmt_and_clippy()?;
    toolchain::ensure_toolchain()?;
    // CI builds a clean clone once: incremental state is never reused there, and it was 2.8 of
    // the run's 12 GB of `target` (debug and image builds), on a runner that once ran out of disk.
    if env::var_os("CI").is_some_and(|v| !v.is_empty())
        && env::var_os("CARGO_INCREMENTAL").is_none()
    {
        eprintln!("[xtask] CI: CARGO_INCREMENTAL=0 (a clean build reuses no incremental state)");
        env::set_var("CARGO_INCREMENTAL", "0");
    }
    // A full run (no filter) builds the image; its build starts now, beside the checks and the
    // debug build, instead of alone at the end.
    let full = args.is_empty();
    let prebuild = if full { Some(Prebuild::start()?) } else { None };
    step(cargo().args(["fmt", "--all", "--", "--check"]))?;
    eprintln!("[xtask] running check-deploy");
    deploy::check(&deploy::default_dir())?;
    // clippy lints the workspace's crates as the test build compiles them (clippy-driver as the
    // workspace's rustc wrapper, warnings denied), instead of a `cargo clippy` of its own that
    // checked every dependency a second time (579 of 1630 s of a clean run here).
    let lint = lint_env()?;
    eprintln!(
        "[xtask] the builds below lint the workspace's crates: RUSTC_WORKSPACE_WRAPPER={} (clippy, \
         warnings denied)",
        lint[0].1.to_string_lossy()
    );
    if full {
        // Every target `cargo clippy --all-targets` lints: the benches too, built but not run.
        let mut build = cargo();
        build
            .args(xtask::WORKSPACE_TEST_ARGS)
            .args(["--all-targets", "--no-run"])
            .envs(lint.iter().map(|(k, v)| (k, v)));
        step(&mut build)?;
    }
    let mut test = cargo();
    test.args(cargo_test_args(args))
        .envs(lint.iter().map(|(k, v)| (k, v)));
    step(&mut test)?;
    if let Some(prebuild) = prebuild {
        prebuild.finish()?;
    }
    eprintln!(
        "[xtask] all checks and tests passed in {} s",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// The environment that makes a cargo build lint the workspace's crates as `cargo clippy -- -D
/// warnings` does: clippy's driver (beside the cargo that runs us) as the rustc of workspace
/// members, dependencies compiled by rustc as usual. The same lints, plus the code generation the
/// tests need. Builds with and without it differ in fingerprint: a plain `cargo test` after this
/// recompiles the workspace's own crates (not their dependencies).
fn lint_env() -> Result<Vec<(&'static str, OsString)>> {
    let cargo = env::var_os("CARGO").map(PathBuf::from);
    let driver = cargo
        .as_deref()
        .map(|c| c.with_file_name("clippy-driver"))
        .filter(|d| d.is_file())
        .map_or_else(|| OsString::from("clippy-driver"), PathBuf::into_os_string);
    if !succeeds(Command::new(&driver).arg("--version")) {
        bail!(
            "clippy's driver ({}) does not run; `rustup component add clippy` installs it",
            driver.to_string_lossy()
        );
    }
    Ok(vec![
        ("RUSTC_WORKSPACE_WRAPPER", driver),
        // cargo-clippy's encoding of `-- -D warnings`.
        (
            "CLIPPY_ARGS",
            OsString::from("-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"),
        ),
    ])
}

/// The image's build running in the background, in its own process group (cargo and its
/// rustc jobs), its output in a log file; stopped if `test` ends before it does.
struct Prebuild {
    child: std::process::Child,
    log: PathBuf,
}

impl Prebuild {
    fn start() -> Result<Prebuild> {
        let dir = xtask::target_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let log = dir.join("xtask-image-prebuild.log");
        let out = std::fs::File::create(&log)
            .with_context(|| format!("failed to create {}", log.display()))?;
        let mut cmd = image::prebuild_command(xtask::IMAGE_TEST_PROFILE)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        eprintln!(
            "[xtask] running `{}` in the background (log: {})",
            describe(&cmd),
            log.display()
        );
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start `{}`", describe(&cmd)))?;
        Ok(Prebuild { child, log })
    }

    /// Waits for the build (the image test has usually waited for it already) and fails if it
    /// failed: that failure is the image test's too, but its log is here.
    fn finish(mut self) -> Result<()> {
        let status = self.child.wait().context("waiting for the image build")?;
        if !status.success() {
            bail!(
                "the image's build failed ({status}); its output: {}",
                self.log.display()
            );
        }
        // Cargo's own timing of the build, for the run's record.
        if let Ok(log) = std::fs::read_to_string(&self.log) {
            if let Some(done) = log
                .lines()
                .rev()
                .find(|l| l.trim_start().starts_with("Finished"))
            {
                eprintln!("[xtask] the image's build: {}", done.trim());
            }
        }
        Ok(())
    }
}

impl Drop for Prebuild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let group = format!("-{}", self.child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            let _ = self.child.wait();
        }
    }
}

/// `cargo test`'s arguments: ours, then the user's. `--no-fail-fast` so one failing test binary
/// does not hide the others' results; it goes before the user's arguments, since everything after
/// their `--` belongs to the test binaries.
fn cargo_test_args(user: Vec<OsString>) -> Vec<OsString> {
    xtask::WORKSPACE_TEST_ARGS
        .into_iter()
        .chain(["--no-fail-fast"])
        .map(OsString::from)
        .chain(user)
        .collect()
}

fn demo(args: Vec<OsString>) -> Result<()> {
    ensure_debian_tools()?;
    toolchain::ensure_toolchain()?;
    step(cargo().args(["build", "--package", "ambit-agent"]))?;
    let ambit = xtask::target_dir().join("debug").join("ambit");
    let mut cmd = Command::new(&ambit);
    cmd.arg("demo").args(args);
    eprintln!("[xtask] running `{}`", describe(&cmd));
    // exec: the demo owns the terminal, and Ctrl-C reaches it directly.
    let err = cmd.exec();
    Err(err).with_context(|| format!("failed to run {}", ambit.display()))
}

/// The cargo that runs us (cargo sets `CARGO`), in the workspace root, without what `cargo run` set
/// for us.
fn cargo() -> Command {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = cmd::nested_cargo(&cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs one step with the terminal as its stdio; any failure fails the task.
fn step(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    eprintln!("[xtask] running `{line}`");
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    let took = started.elapsed().as_secs();
    if !status.success() {
        bail!("`{line}` failed ({status}) after {took} s");
    }
    eprintln!("[xtask] `{line}` took {took} s");
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let program = cmd.get_program().to_string_lossy();
    let program = if program.ends_with("/cargo") {
        "cargo".into()
    } else {
        program
    };
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
    format!("{program} {}", args.join(" "))
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_rustfmt_and_clippy() -> Result<()> {
    if succeeds(cargo().args(["fmt", "--version"]))
        && succeeds(cargo().args(["clippy", "--version"]))
    {
        return Ok(());
    }
    // The active toolchain (rustup passes it down in RUSTUP_TOOLCHAIN).
    step(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))
}

/// Installs the missing ones of [`DEBIAN_TOOLS`] with apt-get.
fn ensure_debian_tools() -> Result<()> {
    if !succeeds(Command::new("dpkg-query").arg("--version")) {
        bail!(
            "dpkg-query not found: this task installs its tools with apt-get (Debian, Ubuntu); \
             install {} yourself and run it again",
            DEBIAN_TOOLS.join(" ")
        );
    }
    let missing: Vec<&str> = DEBIAN_TOOLS
        .into_iter()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root()? {
        bail!(
            "missing Debian packages: {}. Run as root, or `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("[xtask] installing Debian packages: {}", missing.join(" "));
    step(Command::new("apt-get").arg("update"))?;
    step(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout == b"installed")
}

fn is_root() -> Result<bool> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("failed to run `id -u`")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<OsString> {
        match parse(argv.iter().map(OsString::from).collect()) {
            Task::Test { args } => args,
            _ => panic!("not the test task"),
        }
    }

    #[test]
    fn test_passes_its_arguments_to_cargo_test() {
        assert_eq!(test_args(&["xtask", "test"]), Vec::<OsString>::new());
        assert_eq!(
            test_args(&["xtask", "test", "-p", "ambit-agent", "--", "--nocapture"]),
            ["-p", "ambit-agent", "--", "--nocapture"]
        );
        assert_eq!(
            test_args(&["xtask", "test", "--", "--nocapture"]),
            ["--", "--nocapture"]
        );
        assert_eq!(test_args(&["xtask", "test", "--release"]), ["--release"]);
    }

    #[test]
    fn cargo_test_fails_late_and_keeps_the_users_separator() {
        let args = cargo_test_args(test_args(&[
            "xtask",
            "test",
            "-p",
            "ambit-agent",
            "--",
            "--nocapture",
        ]));
        let pos = |arg: &str| args.iter().position(|a| a == arg).expect(arg);
        assert!(pos("--no-fail-fast") < pos("--"), "{args:?}");
        assert!(pos("-p") < pos("--"), "{args:?}");
        assert_eq!(args.last().unwrap(), "--nocapture");
        assert_eq!(args.iter().filter(|a| *a == "--").count(), 1, "{args:?}");
    }

    #[test]
    fn check_deploy_takes_a_directory() {
        let argv = ["xtask", "check-deploy", "--dir", "/tmp/old"].map(OsString::from);
        match parse(argv.to_vec()) {
            Task::CheckDeploy { dir } => assert_eq!(dir, Some(PathBuf::from("/tmp/old"))),
            _ => panic!("not the check-deploy task"),
        }
    }

    #[test]
    fn demo_passes_its_arguments_without_a_separator() {
        let demo_args = |argv: &[&str]| match parse(argv.iter().map(OsString::from).collect()) {
            Task::Demo { args } => args,
            _ => panic!("not the demo task"),
        };
        assert_eq!(demo_args(&["xtask", "demo", "--", "--help"]), ["--help"]);
        assert_eq!(
            demo_args(&["xtask", "demo", "--pods", "3"]),
            ["--pods", "3"]
        );
    }
}
