//! The base side of a comparison: a scratch git worktree of the base revision, the bench-only
//! commits it is given (`Bench-Compare: backport`), and what differs in the method between it
//! and the current tree.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use xtask::cmd;

/// Directories whose difference between the trees changes what the benches measure or how.
pub const METHOD_DIRS: &[&str] = &["agent/benches", "agent/src/harness"];

/// The trailer (key and value) that marks a commit the base gets when it lacks it.
const TRAILER_KEY: &str = "Bench-Compare";
const TRAILER_VALUE: &str = "backport";
/// A backported commit may only touch the benches: what it changes must not be the agent.
const BACKPORT_MAY_TOUCH: &str = "agent/benches/";

/// Runs git in `dir` and returns its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let mut c = Command::new("git");
    c.arg("-C").arg(dir).args(args);
    Ok(cmd::output(&mut c)?.trim().to_owned())
}

/// A detached worktree of the base revision, removed (and its registration pruned) on `remove`
/// or drop, so the repository's `git worktree list` stays clean.
pub struct Scratch {
    repo: PathBuf,
    path: PathBuf,
    removed: bool,
}

/// A commit marked for the base, and whether the base took it.
pub struct Backport {
    pub commit: String,
    pub subject: String,
    /// Why it was not applied: the base already has it, or has changed the same lines (then it
    /// usually carries its own version of the change).
    pub skipped: Option<String>,
}

impl Scratch {
    /// Checks `commit` out at `path`, first removing what an interrupted comparison left there.
    pub fn checkout(repo: &Path, path: &Path, commit: &str) -> Result<Scratch> {
        remove_worktree(repo, path)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        let p = path
            .to_str()
            .context("the target dir's path is not UTF-8")?;
        git(repo, &["worktree", "add", "--detach", "--quiet", p, commit])?;
        Ok(Scratch {
            repo: repo.to_path_buf(),
            path: path.to_path_buf(),
            removed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies, oldest first, every commit of `base..HEAD` (of `repo`) whose message carries the
    /// `Bench-Compare: backport` trailer: the benches' JSON output and the bench fixes a base
    /// without them needs to run at all. Each must touch nothing outside agent/benches/. One that
    /// does not apply is skipped with a warning: the base already has it, or its own version of
    /// the change (main's refactor fixed the capture bench's view itself). If the base needed it
    /// after all, its runs say so (no JSON, or INVALID path checks).
    pub fn apply_backports(&self, repo: &Path, base: &str) -> Result<Vec<Backport>> {
        let format = format!("--format=%H %(trailers:key={TRAILER_KEY},valueonly,separator=%x2C)");
        let log = git(
            repo,
            &["log", "--reverse", &format, &format!("{base}..HEAD")],
        )?;
        let mut out = Vec::new();
        for commit in marked_commits(&log) {
            let files = git(
                repo,
                &["diff-tree", "--no-commit-id", "--name-only", "-r", &commit],
            )?;
            let outside: Vec<&str> = files
                .lines()
                .filter(|f| !f.starts_with(BACKPORT_MAY_TOUCH))
                .collect();
            let subject = git(repo, &["log", "-1", "--format=%s", &commit])?;
            if !outside.is_empty() {
                bail!(
                    "commit {commit} ({subject}) is marked `{TRAILER_KEY}: {TRAILER_VALUE}` but \
                     touches {}: a backport may only change {BACKPORT_MAY_TOUCH}",
                    outside.join(", ")
                );
            }
            let skipped = self.pick(&commit)?;
            let short = &commit[..10];
            match &skipped {
                None => eprintln!("[xtask] base: applied {short} {subject} (bench-only)"),
                Some(why) => eprintln!(
                    "[xtask] warning: base: skipped {short} {subject}: {why}; if the base needed \
                     it, its runs will fail or show INVALID path checks"
                ),
            }
            out.push(Backport {
                commit,
                subject,
                skipped,
            });
        }
        Ok(out)
    }

    /// Cherry-picks one commit onto the scratch checkout (committed there, so that a later
    /// conflict can be undone alone; only this worktree's detached HEAD moves). Returns why it
    /// was skipped, if it was.
    fn pick(&self, commit: &str) -> Result<Option<String>> {
        let ident = [
            "-c",
            "user.name=bench-compare",
            "-c",
            "user.email=bench-compare@localhost",
        ];
        let mut args = ident.to_vec();
        args.extend(["cherry-pick", commit]);
        let Err(e) = git(&self.path, &args) else {
            return Ok(None);
        };
        let conflicts = git(&self.path, &["diff", "--name-only", "--diff-filter=U"])
            .unwrap_or_default()
            .replace('\n', ", ");
        git(&self.path, &["cherry-pick", "--abort"])
            .with_context(|| format!("undoing the failed cherry-pick of {commit}: {e:#}"))?;
        Ok(Some(if conflicts.is_empty() {
            "the base already has this change (nothing left to apply)".to_owned()
        } else {
            format!("the base changed the same lines ({conflicts})")
        }))
    }

    /// Removes the worktree and its registration.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        remove_worktree(&self.repo, &self.path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = remove_worktree(&self.repo, &self.path) {
                eprintln!(
                    "[xtask] warning: could not remove the worktree {}: {e:#}",
                    self.path.display()
                );
            }
        }
    }
}

/// The commits whose trailer value is ours, from `git log --format='%H <values>'` lines.
fn marked_commits(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            let (hash, values) = line.split_once(' ')?;
            values
                .split(',')
                .any(|v| v.trim() == TRAILER_VALUE)
                .then(|| hash.to_owned())
        })
        .collect()
}

/// Removes the worktree at `path` if git knows it, whatever is left of the directory, and then
/// prunes registrations whose directory is gone.
fn remove_worktree(repo: &Path, path: &Path) -> Result<()> {
    let list = git(repo, &["worktree", "list", "--porcelain"])?;
    let registered = list
        .lines()
        .filter_map(|l| l.strip_prefix("worktree "))
        .any(|p| Path::new(p) == path);
    if registered {
        let p = path
            .to_str()
            .context("the target dir's path is not UTF-8")?;
        git(repo, &["worktree", "remove", "--force", "--force", p])?;
    }
    if path.exists() {
        fs::remove_dir_all(path).with_context(|| format!("failed to remove {}", path.display()))?;
    }
    git(repo, &["worktree", "prune"])?;
    Ok(())
}

/// Files under `dirs` whose content differs between the trees at `a` and `b` (or that only one
/// has), as paths relative to the tree. Markdown is left out: results and prose measure nothing.
pub fn differing_files(a: &Path, b: &Path, dirs: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for dir in dirs {
        let mut files = BTreeSet::new();
        for root in [a, b] {
            list_files(&root.join(dir), Path::new(dir), &mut files)?;
        }
        let code = files
            .into_iter()
            .filter(|f| f.extension().is_none_or(|e| e != "md"));
        for f in code {
            if fs::read(a.join(&f)).ok() != fs::read(b.join(&f)).ok() {
                out.push(f.to_string_lossy().into_owned());
            }
        }
    }
    Ok(out)
}

fn list_files(dir: &Path, rel: &Path, out: &mut BTreeSet<PathBuf>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let rel = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            list_files(&e.path(), &rel, out)?;
        } else {
            out.insert(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_commits_with_our_trailer_are_backported() {
        let log = "aaa backport\nbbb \nccc other,backport\nddd backports\n";
        assert_eq!(marked_commits(log), ["aaa", "ccc"]);
    }

    /// A repository: `base` (x = 1), `other` (x = 3, from base), and HEAD = base + a marked
    /// commit setting x = 2 + an unmarked one + a marked one adding y.
    fn repo(dir: &Path) -> (String, String) {
        let run = |args: &[&str]| {
            let mut all = vec!["-c", "user.name=t", "-c", "user.email=t@t"];
            all.extend(args);
            git(dir, &all).unwrap()
        };
        let commit = |file: &str, content: &str, msg: &str| {
            let p = dir.join(file);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
            run(&["add", "-A"]);
            run(&["commit", "-q", "-m", msg]);
            run(&["rev-parse", "HEAD"])
        };
        fs::create_dir_all(dir).unwrap();
        run(&["init", "-q", "-b", "main"]);
        let base = commit("agent/benches/x", "1\n", "base");
        run(&["checkout", "-q", "-b", "other"]);
        let other = commit("agent/benches/x", "3\n", "other");
        run(&["checkout", "-q", "main"]);
        commit("agent/benches/x", "2\n", "x = 2\n\nBench-Compare: backport");
        commit("agent/src/z", "1\n", "not marked");
        commit("agent/benches/y", "1\n", "add y\n\nBench-Compare: backport");
        (base, other)
    }

    #[test]
    fn backports_apply_in_order_and_conflicts_are_skipped() {
        let tmp = std::env::temp_dir().join(format!("xtask-backport-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let (base, other) = repo(&tmp.join("repo"));
        let repo = tmp.join("repo");
        let read = |s: &Scratch, f: &str| fs::read_to_string(s.path().join(f)).ok();

        let s = Scratch::checkout(&repo, &tmp.join("scratch"), &base).unwrap();
        let done = s.apply_backports(&repo, &base).unwrap();
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|b| b.skipped.is_none()));
        assert_eq!(read(&s, "agent/benches/x").as_deref(), Some("2\n"));
        assert_eq!(read(&s, "agent/benches/y").as_deref(), Some("1\n"));
        // The unmarked commit is not applied.
        assert_eq!(read(&s, "agent/src/z"), None);
        s.remove().unwrap();

        // `other` changed x itself: that backport is skipped, the next still applies.
        let s = Scratch::checkout(&repo, &tmp.join("scratch"), &other).unwrap();
        let done = s.apply_backports(&repo, &other).unwrap();
        let skipped = done[0].skipped.as_deref().unwrap();
        assert!(skipped.contains("agent/benches/x"), "{skipped}");
        assert_eq!(read(&s, "agent/benches/x").as_deref(), Some("3\n"));
        assert_eq!(read(&s, "agent/benches/y").as_deref(), Some("1\n"));
        drop(s);
        // Dropping removed the worktree and its registration.
        assert!(!tmp.join("scratch").exists());
        let list = git(&repo, &["worktree", "list", "--porcelain"]).unwrap();
        assert_eq!(list.matches("worktree ").count(), 1, "{list}");
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn differing_files_names_changed_added_and_removed_files() {
        let tmp = std::env::temp_dir().join(format!("xtask-diff-{}", std::process::id()));
        let (a, b) = (tmp.join("a"), tmp.join("b"));
        for (root, files) in [
            (
                &a,
                [
                    ("x/same", "1"),
                    ("x/changed", "1"),
                    ("x/d/only_a", "1"),
                    ("x/R.md", "1"),
                ],
            ),
            (
                &b,
                [
                    ("x/same", "1"),
                    ("x/changed", "2"),
                    ("x/only_b", "1"),
                    ("x/R.md", "2"),
                ],
            ),
        ] {
            for (f, content) in files {
                let p = root.join(f);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, content).unwrap();
            }
        }
        let got = differing_files(&a, &b, &["x", "missing"]).unwrap();
        fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(got, ["x/changed", "x/d/only_a", "x/only_b"]);
    }
}
