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

/// A commit given to the base.
pub struct Backport {
    pub commit: String,
    pub subject: String,
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

    /// Applies, in order and uncommitted, every commit of `base..HEAD` (of `repo`) whose message
    /// carries the `Bench-Compare: backport` trailer: the benches' JSON output and the bench fixes
    /// a base without them needs to run at all. Each must touch nothing outside agent/benches/.
    pub fn apply_backports(&self, repo: &Path, base: &str) -> Result<Vec<Backport>> {
        let format = format!("--format=%H %(trailers:key={TRAILER_KEY},valueonly,separator=%x2C)");
        let log = git(
            repo,
            &["log", "--reverse", &format, &format!("{base}..HEAD")],
        )?;
        let commits = marked_commits(&log);
        let mut out = Vec::new();
        for commit in &commits {
            let files = git(
                repo,
                &["diff-tree", "--no-commit-id", "--name-only", "-r", commit],
            )?;
            let outside: Vec<&str> = files
                .lines()
                .filter(|f| !f.starts_with(BACKPORT_MAY_TOUCH))
                .collect();
            let subject = git(repo, &["log", "-1", "--format=%s", commit])?;
            if !outside.is_empty() {
                bail!(
                    "commit {commit} ({subject}) is marked `{TRAILER_KEY}: {TRAILER_VALUE}` but \
                     touches {}: a backport may only change {BACKPORT_MAY_TOUCH}",
                    outside.join(", ")
                );
            }
            out.push(Backport {
                commit: commit.clone(),
                subject,
            });
        }
        if commits.is_empty() {
            return Ok(out);
        }
        let mut args = vec!["cherry-pick", "--no-commit"];
        args.extend(commits.iter().map(String::as_str));
        if let Err(e) = git(&self.path, &args) {
            let conflicts = git(&self.path, &["diff", "--name-only", "--diff-filter=U"])
                .unwrap_or_default()
                .replace('\n', ", ");
            bail!(
                "the base {base} does not take the bench-only commits it needs ({}): conflicts in \
                 [{conflicts}]. Its benches differ too much from these; compare against a later \
                 base. ({e:#})",
                out.iter()
                    .map(|b| format!("{} {}", &b.commit[..10], b.subject))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        for b in &out {
            eprintln!(
                "[xtask] base: applied {} {} (bench-only)",
                &b.commit[..10],
                b.subject
            );
        }
        Ok(out)
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
/// has), as paths relative to the tree.
pub fn differing_files(a: &Path, b: &Path, dirs: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for dir in dirs {
        let mut files = BTreeSet::new();
        for root in [a, b] {
            list_files(&root.join(dir), Path::new(dir), &mut files)?;
        }
        for f in files {
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

    #[test]
    fn differing_files_names_changed_added_and_removed_files() {
        let tmp = std::env::temp_dir().join(format!("xtask-diff-{}", std::process::id()));
        let (a, b) = (tmp.join("a"), tmp.join("b"));
        for (root, files) in [
            (
                &a,
                [("x/same", "1"), ("x/changed", "1"), ("x/d/only_a", "1")],
            ),
            (&b, [("x/same", "1"), ("x/changed", "2"), ("x/only_b", "1")]),
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
