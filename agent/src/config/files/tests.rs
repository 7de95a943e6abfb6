//! The file source against bad input: symlink loops and duplicates, ConfigMap volume layouts,
//! documents too deep or too large, a root that is not there, and re-reading only what changed.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::bounds::{documents, Document};
use super::depth::measure;
use super::*;
use crate::config::SourceEvent;
use crate::identity::tests::TempDir;

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
}

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn dir(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    std::fs::create_dir_all(d.path()).expect("create temp dir");
    d
}

/// Namespace names in a `Replace`, sorted.
fn names(event: &SourceEvent) -> Vec<String> {
    let SourceEvent::Replace { objects, .. } = event else {
        panic!("expected a Replace, got {event:?}");
    };
    let mut n: Vec<String> = objects.iter().map(|o| o.object_ref().name).collect();
    n.sort();
    n
}

/// Names of the objects a `Replace` keeps as rejected (their last good version stays).
fn kept(event: &SourceEvent) -> Vec<String> {
    let SourceEvent::Replace { rejected, .. } = event else {
        panic!("expected a Replace, got {event:?}");
    };
    rejected.iter().map(|r| r.object.name.clone()).collect()
}

/// The YAML of `n` nested flow mappings, the shape whose parse time is quadratic in libyaml.
fn nested(n: usize) -> String {
    format!("{}1{}\n", "{a: ".repeat(n), "}".repeat(n))
}

/// Runs `f` on a thread and waits for it with a generous ceiling, so that a hang fails the test
/// instead of stalling the run.
fn terminates<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} did not return within 60 s"))
}

#[test]
fn two_directory_symlinks_to_the_dir_itself_are_not_followed_into_a_loop() {
    let d = dir("files-selflinks");
    write(&d.path().join("good.yaml"), &namespace("good"));
    symlink(".", d.path().join("l1")).expect("symlink");
    symlink(".", d.path().join("l2")).expect("symlink");
    let walk = terminates("walk", {
        let p = d.path().to_path_buf();
        move || yaml_files(&p).expect("walk")
    });
    let files: Vec<_> = walk.files.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(
        files,
        vec![d.path().join("good.yaml")],
        "each real file once"
    );
    let mut source = FileSource::new(d.path());
    let event = source.poll().expect("first poll");
    assert_eq!(names(&event), vec!["good"]);
    assert_eq!(
        source.reads(),
        1,
        "the file is read once, not once per path"
    );
    assert!(source.file_errors.is_empty(), "{:?}", source.file_errors);
}

#[test]
fn a_symlink_loop_below_the_dir_is_walked_once() {
    let d = dir("files-loop");
    write(&d.path().join("a/ns.yaml"), &namespace("inner"));
    symlink("..", d.path().join("a/b")).expect("symlink a/b -> ..");
    write(&d.path().join("top.yaml"), &namespace("top"));
    let mut source = FileSource::new(d.path());
    let event = terminates("poll", move || (source.poll(), source.reads()));
    assert_eq!(names(&event.0.expect("first poll")), vec!["inner", "top"]);
    assert_eq!(event.1, 2, "two real files, each read once");
}

#[test]
fn a_symlink_to_a_file_outside_the_dir_is_read_once() {
    let outside = dir("files-outside-target");
    write(&outside.path().join("shared.yaml"), &namespace("shared"));
    let d = dir("files-outside");
    symlink(
        outside.path().join("shared.yaml"),
        d.path().join("link.yaml"),
    )
    .expect("symlink");
    let mut source = FileSource::new(d.path());
    assert_eq!(names(&source.poll().expect("first poll")), vec!["shared"]);
    assert_eq!(source.reads(), 1);
}

#[test]
fn the_same_file_behind_two_symlinks_is_read_once() {
    let d = dir("files-twice");
    write(&d.path().join("real/ns.yaml"), &namespace("once"));
    symlink("real/ns.yaml", d.path().join("one.yaml")).expect("symlink");
    symlink("real/ns.yaml", d.path().join("two.yaml")).expect("symlink");
    symlink("real", d.path().join("again")).expect("symlink to the directory");
    let walk = yaml_files(d.path()).expect("walk");
    let files: Vec<_> = walk.files.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(
        files,
        vec![d.path().join("again/ns.yaml")],
        "one path per real file, the first in sorted order"
    );
    let mut source = FileSource::new(d.path());
    let event = source.poll().expect("first poll");
    assert_eq!(names(&event), vec!["once"]);
    assert_eq!(source.reads(), 1);
}

/// How the kubelet lays out a ConfigMap volume and updates it (atomic writer): visible names
/// are symlinks through `..data`, itself a symlink to a timestamped directory it swaps.
#[test]
fn a_configmap_volume_is_read_through_its_visible_names_and_a_data_swap_is_seen() {
    let d = dir("files-configmap");
    let v1 = d.path().join("..2026_11_30_10_00_00.000000001");
    write(&v1.join("cluster.yaml"), &namespace("first"));
    symlink("..2026_11_30_10_00_00.000000001", d.path().join("..data")).expect("..data");
    symlink("..data/cluster.yaml", d.path().join("cluster.yaml")).expect("visible link");
    let mut source = FileSource::new(d.path());
    assert_eq!(names(&source.poll().expect("first poll")), vec!["first"]);
    assert_eq!(
        source.reads(),
        1,
        "hidden ..data directories are not walked"
    );
    assert!(source.poll().is_none(), "nothing changed");

    // The update: same size and same mtime, so only the file's identity tells it apart.
    let old_mtime = std::fs::metadata(v1.join("cluster.yaml"))
        .and_then(|m| m.modified())
        .expect("mtime");
    let v2 = d.path().join("..2026_11_30_10_05_00.000000002");
    write(&v2.join("cluster.yaml"), &namespace("secnd"));
    std::fs::File::options()
        .write(true)
        .open(v2.join("cluster.yaml"))
        .and_then(|f| f.set_modified(old_mtime))
        .expect("set mtime");
    symlink(
        "..2026_11_30_10_05_00.000000002",
        d.path().join("..data_tmp"),
    )
    .expect("link");
    std::fs::rename(d.path().join("..data_tmp"), d.path().join("..data")).expect("swap");
    std::fs::remove_dir_all(&v1).expect("remove the old version");
    let event = source.poll().expect("the swap is a change");
    assert_eq!(names(&event), vec!["secnd"]);
    assert_eq!(source.reads(), 2);
}

#[test]
fn a_100000_level_document_is_refused_before_parsing_and_the_rest_loads() {
    let d = dir("files-deep");
    let text = format!(
        "{}---\n{}---\n{}",
        namespace("before"),
        nested(100_000),
        namespace("after")
    );
    write(&d.path().join("deep.yaml"), &text);
    write(&d.path().join("good.yaml"), &namespace("beside"));
    let mut source = FileSource::new(d.path());
    let t = Instant::now();
    let (event, errors) = terminates("poll", move || (source.poll(), source.file_errors));
    eprintln!(
        "measured: poll with a 100,000-level document: {:?}",
        t.elapsed()
    );
    assert_eq!(
        names(&event.expect("first poll")),
        vec!["after", "before", "beside"]
    );
    let deep = d.path().join("deep.yaml");
    let want = format!("{}: document 2", deep.display());
    let e = errors
        .iter()
        .find(|e| e.path == want)
        .unwrap_or_else(|| panic!("no error for {want}: {errors:?}"));
    // The limit's own message, not serde_yaml's recursion limit: the parser never saw it.
    assert!(
        e.message
            .starts_with("nested deeper than 64 levels at line 5 column 257"),
        "{e}"
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn a_file_over_the_size_limit_is_refused_from_its_metadata() {
    let d = dir("files-large");
    let big = d.path().join("big.yaml");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(MAX_FILE_BYTES + 1))
        .expect("sparse file");
    write(&d.path().join("good.yaml"), &namespace("good"));
    let mut source = FileSource::new(d.path());
    assert_eq!(names(&source.poll().expect("first poll")), vec!["good"]);
    let e = source
        .file_errors
        .iter()
        .find(|e| e.path == big.display().to_string())
        .unwrap_or_else(|| panic!("no error for big.yaml: {:?}", source.file_errors));
    // Read, its 16 MiB of zeros would have been refused as a document over 3 MiB instead.
    assert_eq!(
        e.message,
        format!(
            "{} bytes, over the limit of 16 MiB for a config file; not read",
            MAX_FILE_BYTES + 1
        )
    );
    assert!(
        source.poll().is_none(),
        "a refused file that did not change is no change"
    );
}

#[test]
fn a_document_over_the_size_limit_is_refused_and_the_next_one_loads() {
    let big = format!("# {}\n{}", "x".repeat(MAX_DOCUMENT_BYTES), namespace("big"));
    let text = format!("{big}---\n{}", namespace("small"));
    let mut loaded = Loaded::default();
    load_text(&mut loaded, Path::new("docs.yaml"), &text);
    let got: Vec<String> = loaded.objects.iter().map(|o| o.object_ref().name).collect();
    assert_eq!(got, vec!["small"]);
    assert_eq!(loaded.file_errors.len(), 1, "{:?}", loaded.file_errors);
    assert_eq!(loaded.file_errors[0].path, "docs.yaml: document 1");
    assert!(
        loaded.file_errors[0]
            .message
            .contains("over the limit of 3 MiB for one document"),
        "{}",
        loaded.file_errors[0]
    );
}

#[test]
fn a_syntax_error_in_one_document_does_not_hide_the_next_and_names_the_file_line() {
    let text = format!(
        "{}---\napiVersion: v1\nkind: [unclosed\n---\n{}",
        namespace("one"),
        namespace("three")
    );
    let mut loaded = Loaded::default();
    load_text(&mut loaded, Path::new("t.yaml"), &text);
    let got: Vec<String> = loaded.objects.iter().map(|o| o.object_ref().name).collect();
    assert_eq!(got, vec!["one", "three"]);
    assert_eq!(loaded.file_errors.len(), 1, "{:?}", loaded.file_errors);
    let e = &loaded.file_errors[0];
    assert_eq!(e.path, "t.yaml: document 2");
    // The unclosed flow sequence is on the file's line 6 (line 3 of its document).
    assert!(e.message.contains("line 6 column"), "{e}");
    assert!(loaded.broken.contains(Path::new("t.yaml")));
}

#[test]
fn an_unchanged_poll_reads_nothing_and_a_change_rereads_only_that_file() {
    let d = dir("files-reads");
    write(&d.path().join("a.yaml"), &namespace("a"));
    write(&d.path().join("b.yaml"), &namespace("b"));
    write(&d.path().join("sub/c.yaml"), &namespace("c"));
    let mut source = FileSource::new(d.path());
    assert_eq!(
        names(&source.poll().expect("first poll")),
        vec!["a", "b", "c"]
    );
    assert_eq!(source.reads(), 3);
    for _ in 0..3 {
        assert!(source.poll().is_none(), "nothing changed");
    }
    assert_eq!(source.reads(), 3, "unchanged polls read no file");

    write(&d.path().join("b.yaml"), &namespace("b2"));
    let event = source.poll().expect("b.yaml changed");
    assert_eq!(
        names(&event),
        vec!["a", "b2", "c"],
        "the full set, every time"
    );
    assert_eq!(source.reads(), 4, "only b.yaml was read again");

    std::fs::remove_file(d.path().join("a.yaml")).expect("remove");
    assert_eq!(names(&source.poll().expect("a removed")), vec!["b2", "c"]);
    assert_eq!(source.reads(), 4, "a removal reads nothing");
}

#[test]
fn a_broken_file_keeps_its_last_good_objects_without_being_reread_each_poll() {
    let d = dir("files-broken");
    write(&d.path().join("a.yaml"), &namespace("a"));
    let mut source = FileSource::new(d.path());
    source.poll().expect("first poll");
    write(&d.path().join("a.yaml"), "apiVersion: v1\nkind: [broken\n");
    let event = source.poll().expect("a.yaml changed");
    assert_eq!(kept(&event), vec!["a"], "its last good version is kept");
    assert!(names(&event).is_empty());
    assert!(source.poll().is_none(), "still broken is no change");
    assert_eq!(source.reads(), 2);
}

#[test]
fn a_missing_root_is_not_an_empty_cluster() {
    let d = TempDir::new("files-root");
    let mut source = FileSource::new(d.path());
    assert!(
        source.poll().is_none(),
        "no Replace while the path is missing"
    );
    let why = source.unavailable().expect("unavailable").to_string();
    assert!(why.contains("No such file or directory"), "{why}");
    assert_eq!(source.file_errors.len(), 1);
    assert_eq!(source.file_errors[0].path, d.path().display().to_string());

    write(&d.path().join("ns.yaml"), &namespace("back"));
    assert_eq!(names(&source.poll().expect("root created")), vec!["back"]);
    assert_eq!(source.unavailable(), None);
    assert!(source.file_errors.is_empty(), "{:?}", source.file_errors);

    // Gone again (an unmounted volume): nothing is emitted, the store keeps the last config.
    let moved = d.path().with_extension("moved");
    std::fs::rename(d.path(), &moved).expect("move away");
    assert!(source.poll().is_none());
    assert!(source.unavailable().is_some());
    std::fs::rename(&moved, d.path()).expect("move back");
    assert_eq!(
        names(&source.poll().expect("back: the full set again")),
        vec!["back"]
    );
    assert_eq!(source.unavailable(), None);
}

#[test]
fn a_root_that_is_not_a_file_or_directory_is_unavailable() {
    let d = dir("files-fifo-root");
    let fifo = d.path().join("config");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let mut source = FileSource::new(&fifo);
    assert!(terminates("poll", move || source.poll().is_none()));
}

#[test]
fn a_fifo_named_like_a_config_file_is_refused_without_blocking() {
    let d = dir("files-fifo");
    nix::unistd::mkfifo(&d.path().join("pipe.yaml"), nix::sys::stat::Mode::S_IRWXU)
        .expect("mkfifo");
    write(&d.path().join("good.yaml"), &namespace("good"));
    let mut source = FileSource::new(d.path());
    let (event, errors) = terminates("poll", move || (source.poll(), source.file_errors));
    assert_eq!(names(&event.expect("first poll")), vec!["good"]);
    assert!(
        errors
            .iter()
            .any(|e| e.path.ends_with("pipe.yaml") && e.message.contains("not a regular file")),
        "{errors:?}"
    );
}

#[test]
fn check_terminates_on_every_bad_input_with_a_clear_message() {
    let loops = dir("files-check-loops");
    write(&loops.path().join("good.yaml"), &namespace("good"));
    symlink(".", loops.path().join("l1")).expect("symlink");
    symlink(".", loops.path().join("l2")).expect("symlink");
    write(&loops.path().join("a/x.yaml"), &namespace("x"));
    symlink("..", loops.path().join("a/b")).expect("symlink");
    let deep = dir("files-check-deep");
    write(&deep.path().join("deep.yaml"), &nested(100_000));
    let large = dir("files-check-large");
    std::fs::File::create(large.path().join("big.yaml"))
        .and_then(|f| f.set_len(50_000_000))
        .expect("sparse file");
    let missing = TempDir::new("files-check-missing");

    let run = |p: &Path| {
        let p = p.to_path_buf();
        terminates("check", move || crate::app::check(&p))
    };
    assert_eq!(
        run(loops.path()),
        Vec::<String>::new(),
        "loops are no problem"
    );
    let problems = run(deep.path());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("deep.yaml: document 1: nested deeper than 64 levels"),
        "{problems:?}"
    );
    let problems = run(large.path());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("big.yaml: 50000000 bytes, over the limit of 16 MiB"),
        "{problems:?}"
    );
    let problems = run(missing.path());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("cannot read the config path"),
        "{problems:?}"
    );
}

#[test]
fn depth_counts_flow_and_block_nesting_up_to_the_limit() {
    assert_eq!(measure(&nested(MAX_DEPTH), MAX_DEPTH).over, None);
    assert!(measure(&nested(MAX_DEPTH + 1), MAX_DEPTH).over.is_some());
    assert_eq!(measure(&"[".repeat(5), 100).max_flow, 5);
    // Block levels: each `- ` of a compact nested sequence opens one.
    let block = format!("{}x\n", "- ".repeat(MAX_DEPTH + 1));
    assert!(measure(&block, MAX_DEPTH).over.is_some());
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {app: a}\nspec:\n  containers:\n  - name: c\n    ports: [{containerPort: 80}]\n";
    let d = measure(pod, MAX_DEPTH);
    assert_eq!((d.max, d.max_flow, d.over), (5, 2, None));
}

#[test]
fn depth_skips_brackets_in_scalars_and_comments_as_libyaml_does() {
    let many = "[{".repeat(200);
    let text = format!(
        "a: \"{many}\"\nb: '{many}'\nc: x{many}\n# {many}\nd: |\n  {many}\n  {many}\ne: >-\n    {many}\nf: plain\n  continued {many}\n"
    );
    let d = measure(&text, MAX_DEPTH);
    assert_eq!((d.max_flow, d.over), (0, None), "{d:?}");
}

#[test]
fn depth_sees_flow_nesting_libyaml_scans_after_a_scalar_ends() {
    let deep = "{a: ".repeat(100);
    // A block scalar ends at the first line indented less than its content; the parent
    // mapping's indentation (not the line's) decides.
    let after_block = format!("- - key: |\n      text\n  - {deep}\n");
    assert!(measure(&after_block, MAX_DEPTH).over.is_some());
    // A line indented no more than its mapping ends a multi-line plain scalar.
    let after_plain = format!("k: a\n  \"\nm: {deep}\n");
    assert!(measure(&after_plain, MAX_DEPTH).over.is_some());
    // A quote inside a plain scalar starts nothing.
    let quote_in_plain = format!("k: it's\nm: {deep}\n");
    assert!(measure(&quote_in_plain, MAX_DEPTH).over.is_some());
}

#[test]
fn documents_split_at_document_markers_keeping_directives_and_comments_with_the_next() {
    let text = "# head\n---\na: 1\n...\n%YAML 1.2\n---\nb: 2\n--- |\n  text\n";
    let docs = documents(text);
    let texts: Vec<&str> = docs.iter().map(|d| d.text).collect();
    assert_eq!(
        texts,
        vec![
            "# head\n---\na: 1\n...\n",
            "%YAML 1.2\n---\nb: 2\n",
            "--- |\n  text\n"
        ]
    );
    let lines: Vec<usize> = docs.iter().map(|d| d.first_line).collect();
    assert_eq!(lines, vec![0, 4, 7]);
    assert_eq!(
        documents(""),
        vec![Document {
            text: "",
            first_line: 0
        }]
    );
    // Not markers: indented, or followed by more than a blank.
    assert_eq!(documents("a: |\n  ---\nb: ---x\n----\n").len(), 1);
    // CR LF line ends.
    assert_eq!(documents("a: 1\r\n---\r\nb: 2\r\n").len(), 2);
}
