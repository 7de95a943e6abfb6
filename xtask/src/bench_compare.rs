//! `cargo xtask bench-compare`: builds the `capture` and `hbone` benches of a base revision (in a
//! scratch worktree, [`base`]) and of the current tree, runs the two alternately on this machine,
//! and reports current/base ratios of every figure ([`compare`]). Method: agent/benches/README.md.

mod base;
mod compare;

use std::{
    collections::BTreeMap,
    env, fmt, fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use xtask::{cmd, workspace_root};

/// The benches this compares; each writes its figures as JSON (`AMBIT_BENCH_JSON`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Bench {
    Capture,
    Hbone,
}

impl Bench {
    pub fn name(self) -> &'static str {
        match self {
            Bench::Capture => "capture",
            Bench::Hbone => "hbone",
        }
    }
}

/// Which build a run used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Base,
    Current,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Base => "base",
            Side::Current => "current",
        })
    }
}

pub struct Options {
    /// The git revision to compare against.
    pub base: String,
    pub benches: Vec<Bench>,
    pub rounds: usize,
    /// Extra environment for the current build's runs only.
    pub current_env: Vec<(String, String)>,
    /// Delete the base build tree when done (it is kept for the next comparison by default).
    pub clean: bool,
}

/// One bench run as the comparison reads it.
pub struct Run {
    pub round: usize,
    pub bench: Bench,
    pub side: Side,
    pub seconds: f64,
    /// What the bench wrote to `AMBIT_BENCH_JSON`.
    pub result: Value,
    pub json: PathBuf,
    pub log: PathBuf,
}

/// What `cargo bench --no-run` built for one tree.
struct Built {
    benches: BTreeMap<Bench, PathBuf>,
    /// The `ambit` binary of this build: what `CARGO_BIN_EXE_ambit` names in its hbone bench.
    ambit: PathBuf,
}

pub fn run(mut opts: Options) -> Result<()> {
    let started = Instant::now();
    opts.benches.sort();
    opts.benches.dedup();
    if opts.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if opts
        .current_env
        .iter()
        .any(|(k, _)| k == "AMBIT_BENCH_JSON")
    {
        bail!("--current-env: AMBIT_BENCH_JSON is where bench-compare reads each run's results");
    }
    let root = workspace_root();
    let target = xtask::target_dir();
    let stamp = utc_stamp(SystemTime::now());
    let out_dir = target.join("bench-compare");
    let logs = out_dir.join(&stamp);
    fs::create_dir_all(&logs).with_context(|| format!("failed to create {}", logs.display()))?;

    let base_commit = base::git(
        root,
        &[
            "rev-parse",
            "--verify",
            &format!("{}^{{commit}}", opts.base),
        ],
    )
    .with_context(|| format!("--base {}: not a commit of this repository", opts.base))?;
    let head = base::git(root, &["rev-parse", "HEAD"])?;
    let dirty = !base::git(root, &["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    say(format_args!(
        "comparing base {} ({base_commit}) with the current tree {} (HEAD {head}{})",
        opts.base,
        root.display(),
        if dirty { " + uncommitted changes" } else { "" }
    ));

    // The current tree first: mid-refactor it is the one more likely not to build.
    let current = build(root, None, &opts.benches)?;
    let base_target = target.join("bench-base").join("target");
    let base_src = target.join("bench-base").join("src");
    let scratch = base::Scratch::checkout(root, &base_src, &base_commit)?;
    let backports = scratch.apply_backports(root, &base_commit)?;
    let differences = base::differing_files(scratch.path(), root, base::METHOD_DIRS)?;
    let built_base = build(scratch.path(), Some(&base_target), &opts.benches)?;
    // The executables need nothing from their source tree (the eBPF object is embedded, the agent
    // binary's path is absolute), so the registration need not outlive the build.
    scratch.remove()?;
    check_agents(&built_base, &base_target, &current, &opts.benches)?;
    if !differences.is_empty() {
        say(format_args!(
            "warning: the benches or the harness differ between base and current, so part of any \
             difference may be the method, not the agent: {}",
            differences.join(", ")
        ));
    }

    let mut runs = Vec::new();
    for round in 0..opts.rounds {
        // base, current, current, base, ...: drift on a shared machine lands on both sides.
        let order = if round % 2 == 0 {
            [Side::Base, Side::Current]
        } else {
            [Side::Current, Side::Base]
        };
        for &bench in &opts.benches {
            for side in order {
                let (built, extra_env): (&Built, &[(String, String)]) = match side {
                    Side::Base => (&built_base, &[]),
                    Side::Current => (&current, &opts.current_env),
                };
                let r = run_bench(
                    &RunSpec {
                        round,
                        rounds: opts.rounds,
                        bench,
                        side,
                        exe: &built.benches[&bench],
                        cwd: &root.join("agent"),
                        extra_env,
                        logs: &logs,
                    },
                    &built.ambit,
                )?;
                runs.push(r);
            }
        }
    }

    println!();
    println!(
        "base:    {} = {base_commit}, built from {}",
        opts.base,
        base_src.display()
    );
    for b in &backports {
        let what = b
            .skipped
            .as_deref()
            .map_or("applied".into(), |why| format!("SKIPPED: {why}"));
        println!("         + {} {} ({what})", &b.commit[..10], b.subject);
    }
    println!(
        "current: {} at HEAD {head}{}{}",
        root.display(),
        if dirty { " + uncommitted changes" } else { "" },
        if opts.current_env.is_empty() {
            String::new()
        } else {
            let env: Vec<String> = opts
                .current_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(", runs with {}", env.join(" "))
        }
    );
    let comparison = compare::compare(&opts.benches, opts.rounds, &runs);
    compare::print(&comparison, &runs, opts.rounds, &differences);
    let result = json!({
        "schema": 1,
        "started_utc": stamp,
        "seconds": started.elapsed().as_secs_f64(),
        "rounds": opts.rounds,
        "benches": opts.benches.iter().map(|b| b.name()).collect::<Vec<_>>(),
        "bench_env": bench_env(),
        "base": {
            "rev": opts.base,
            "commit": base_commit,
            "backports": backports.iter().map(|b| json!({"commit": b.commit, "subject": b.subject, "skipped": b.skipped})).collect::<Vec<_>>(),
            "ambit": built_base.ambit,
            "executables": built_base.benches.iter().map(|(b, p)| (b.name(), p)).collect::<BTreeMap<_, _>>(),
        },
        "current": {
            "tree": root,
            "head": head,
            "uncommitted_changes": dirty,
            "ambit": current.ambit,
            "executables": current.benches.iter().map(|(b, p)| (b.name(), p)).collect::<BTreeMap<_, _>>(),
            "extra_env": opts.current_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        },
        "method_differences": differences,
        "runs": runs.iter().map(compare::run_json).collect::<Vec<_>>(),
        "comparison": compare::to_json(&comparison),
    });
    let file = out_dir.join(format!("{stamp}.json"));
    let text = serde_json::to_string_pretty(&result).context("serialising the result")?;
    fs::write(&file, text + "\n").with_context(|| format!("failed to write {}", file.display()))?;
    println!();
    println!("result: {}", file.display());
    println!("logs and each run's JSON: {}", logs.display());
    if opts.clean {
        fs::remove_dir_all(target.join("bench-base"))
            .with_context(|| format!("failed to remove {}", base_target.display()))?;
        println!("removed the base build ({})", base_target.display());
    } else {
        println!(
            "base build kept for the next comparison: {} (--clean removes it)",
            base_target.display()
        );
    }
    println!("total time: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Builds the bench executables of the tree at `dir` and returns their paths. The base gets a
/// target dir of its own: with a shared one, both hbone benches would name the same
/// `target/release/ambit`, holding whichever build came last. The current tree builds where
/// `cargo bench` would (`target_dir` None): setting CARGO_TARGET_DIR where it was not set reruns
/// agent/build.rs (it tracks the variable), and so the eBPF build, on every switch.
fn build(dir: &Path, target_dir: Option<&Path>, benches: &[Bench]) -> Result<Built> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut c = cmd::nested_cargo(&cargo);
    c.args(["bench", "--package", "ambit-agent", "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if let Some(t) = target_dir {
        c.env("CARGO_TARGET_DIR", t);
    }
    for b in benches {
        c.args(["--bench", b.name()]);
    }
    say(format_args!(
        "building in {}: `cargo {}`{}",
        dir.display(),
        c.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        target_dir.map_or(String::new(), |t| format!(
            " (CARGO_TARGET_DIR={})",
            t.display()
        ))
    ));
    let mut child = c
        .spawn()
        .with_context(|| format!("failed to start `{}`", cmd::describe(&c)))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut artifacts = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's messages")?;
        if let Ok(msg) = serde_json::from_str::<Value>(&line) {
            artifacts.push(msg);
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!(
            "building the benches in {} failed ({status}); cargo's errors are above",
            dir.display()
        );
    }
    parse_artifacts(&artifacts, benches)
        .with_context(|| format!("in the build of {}", dir.display()))
}

/// The bench executables and the `ambit` binary among cargo's `compiler-artifact` messages.
fn parse_artifacts(messages: &[Value], benches: &[Bench]) -> Result<Built> {
    let mut found = BTreeMap::new();
    let mut ambit = None;
    for m in messages {
        if m["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(exe), Some(name)) = (m["executable"].as_str(), m["target"]["name"].as_str())
        else {
            continue;
        };
        let kinds = m["target"]["kind"].as_array().cloned().unwrap_or_default();
        if kinds.iter().any(|k| k == "bin") && name == "ambit" {
            ambit = Some(PathBuf::from(exe));
        }
        if kinds.iter().any(|k| k == "bench") {
            if let Some(b) = benches.iter().find(|b| b.name() == name) {
                found.insert(*b, PathBuf::from(exe));
            }
        }
    }
    for b in benches {
        if !found.contains_key(b) {
            bail!("cargo built no executable for the {} bench", b.name());
        }
    }
    let ambit = ambit.context("cargo built no `ambit` binary (bin target of ambit-agent)")?;
    Ok(Built {
        benches: found,
        ambit,
    })
}

/// The two builds must start different agents, each its own: the base's under the base target
/// dir. Checked again after every hbone run against the binary the bench says it started.
fn check_agents(
    base: &Built,
    base_target: &Path,
    current: &Built,
    benches: &[Bench],
) -> Result<()> {
    if !benches.contains(&Bench::Hbone) {
        return Ok(());
    }
    if base.ambit == current.ambit || !base.ambit.starts_with(base_target) {
        bail!(
            "the base build's agent is {}, the current one's {}: the base hbone bench would not \
             start the base's own `ambit`",
            base.ambit.display(),
            current.ambit.display()
        );
    }
    Ok(())
}

struct RunSpec<'a> {
    round: usize,
    rounds: usize,
    bench: Bench,
    side: Side,
    exe: &'a Path,
    cwd: &'a Path,
    extra_env: &'a [(String, String)],
    logs: &'a Path,
}

/// Runs one bench as `cargo bench` would (`<exe> --bench`), its output in log files, and reads
/// its JSON. A bench that fails is an error; one whose path checks failed is reported, not fatal.
fn run_bench(s: &RunSpec<'_>, ambit: &Path) -> Result<Run> {
    let name = format!("{}-r{}-{}", s.bench.name(), s.round + 1, s.side);
    let json_path = s.logs.join(format!("{name}.json"));
    let out_path = s.logs.join(format!("{name}.out"));
    let err_path = s.logs.join(format!("{name}.err"));
    let _ = fs::remove_file(&json_path);
    let out = fs::File::create(&out_path)
        .with_context(|| format!("failed to create {}", out_path.display()))?;
    let err = fs::File::create(&err_path)
        .with_context(|| format!("failed to create {}", err_path.display()))?;
    let mut c = Command::new(s.exe);
    c.arg("--bench")
        .current_dir(s.cwd)
        .env("AMBIT_BENCH_JSON", &json_path)
        .envs(s.extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    say(format_args!(
        "round {}/{}: {} {} ...",
        s.round + 1,
        s.rounds,
        s.bench.name(),
        s.side
    ));
    let t = Instant::now();
    let status = c
        .status()
        .with_context(|| format!("failed to start {}", s.exe.display()))?;
    let seconds = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!(
            "the {} bench ({}) failed ({status}) after {seconds:.0} s; its output: {} and {}\n{}",
            s.bench.name(),
            s.side,
            out_path.display(),
            err_path.display(),
            tail(&err_path, 15)
        );
    }
    let text = fs::read_to_string(&json_path).with_context(|| {
        format!(
            "the {} bench ({}) wrote no JSON to {}: does its tree have AMBIT_BENCH_JSON? Output: {}",
            s.bench.name(),
            s.side,
            json_path.display(),
            out_path.display()
        )
    })?;
    let result: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON", json_path.display()))?;
    if result["bench"] != s.bench.name() {
        bail!(
            "{}: not the {} bench's result",
            json_path.display(),
            s.bench.name()
        );
    }
    if s.bench == Bench::Hbone && result["agent_bin"].as_str().map(Path::new) != Some(ambit) {
        bail!(
            "the {} hbone bench started the agent {}, not its own build's {}",
            s.side,
            result["agent_bin"],
            ambit.display()
        );
    }
    let problems = result["problems"].as_array().map_or(0, Vec::len);
    say(format_args!(
        "round {}/{}: {} {} done in {seconds:.0} s; others {} CPUs (max {}){}",
        s.round + 1,
        s.rounds,
        s.bench.name(),
        s.side,
        compare::fmt_num(result["noise"]["others_cpu_median"].as_f64()),
        compare::fmt_num(result["noise"]["others_cpu_max"].as_f64()),
        if problems > 0 {
            format!(
                "; {problems} path-check problems (INVALID), see {}",
                out_path.display()
            )
        } else {
            String::new()
        }
    ));
    Ok(Run {
        round: s.round,
        bench: s.bench,
        side: s.side,
        seconds,
        result,
        json: json_path,
        log: out_path,
    })
}

/// The `AMBIT_BENCH_*` settings both sides run with (the user's environment).
fn bench_env() -> BTreeMap<String, String> {
    env::vars()
        .filter(|(k, _)| k.starts_with("AMBIT_BENCH_") && k != "AMBIT_BENCH_JSON")
        .collect()
}

/// The last `n` lines of a log file, indented, for an error message.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `YYYYMMDDTHHMMSSZ`, UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn say(msg: impl fmt::Display) {
    eprintln!("[xtask] {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_calendar_dates() {
        let t = |s: u64| utc_stamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(t(0), "19700101T000000Z");
        // 2024-02-29 23:59:59 UTC: a leap day.
        assert_eq!(t(1_709_251_199), "20240229T235959Z");
        assert_eq!(t(1_709_251_200), "20240301T000000Z");
    }

    #[test]
    fn artifacts_name_the_benches_and_the_agent() {
        let msg = |kind: &str, name: &str, exe: &str| json!({"reason": "compiler-artifact", "target": {"kind": [kind], "name": name}, "executable": exe});
        let msgs = [
            json!({"reason": "build-script-executed"}),
            msg("lib", "ambit", "/t/release/libambit.rlib"),
            msg("bin", "ambit", "/t/release/ambit"),
            msg("bench", "capture", "/t/release/deps/capture-1"),
            msg("bench", "hbone", "/t/release/deps/hbone-2"),
        ];
        let built = parse_artifacts(&msgs, &[Bench::Hbone]).unwrap();
        assert_eq!(built.ambit, Path::new("/t/release/ambit"));
        assert_eq!(built.benches.len(), 1);
        assert_eq!(
            built.benches[&Bench::Hbone],
            Path::new("/t/release/deps/hbone-2")
        );
        let err = parse_artifacts(&msgs[..3], &[Bench::Capture])
            .err()
            .unwrap();
        assert!(err.to_string().contains("capture"), "{err}");
    }

    #[test]
    fn the_base_agent_must_be_its_own() {
        let built = |ambit: &str| Built {
            benches: BTreeMap::new(),
            ambit: PathBuf::from(ambit),
        };
        let base_target = Path::new("/w/target/bench-base/target");
        let base = built("/w/target/bench-base/target/release/ambit");
        let current = built("/w/target/release/ambit");
        assert!(check_agents(&base, base_target, &current, &[Bench::Hbone]).is_ok());
        assert!(check_agents(&current, base_target, &current, &[Bench::Hbone]).is_err());
        assert!(check_agents(&current, base_target, &current, &[Bench::Capture]).is_ok());
    }
}
