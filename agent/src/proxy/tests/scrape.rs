//! A scrape of a node's metrics in Prometheus' text format, read by series and labels, so tests
//! assert on what a Prometheus would see.

use std::collections::BTreeMap;

/// A scrape of a node's metrics, in Prometheus' text format.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the one series of `name` whose labels include `labels`; None when no series
    /// matches. Panics when several do (the test must say which one it means).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let matches: Vec<(BTreeMap<String, String>, u64)> = self
            .series(name)
            .into_iter()
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matches.len() <= 1,
            "{name}{labels:?} matches {} series: {matches:?}",
            matches.len()
        );
        matches.first().map(|(_, v)| *v)
    }

    /// Every series of `name`, with its labels.
    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, u64)> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(parse_sample)
            .filter(|(n, _, _)| n == name)
            .map(|(_, labels, v)| (labels, v))
            .collect()
    }
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `name{k="v",...} value` → (name, labels, value).
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, u64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let value = value.parse::<f64>().ok()? as u64;
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head.to_string(), BTreeMap::new(), value));
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let key = key.trim_start_matches(',').to_string();
        if key.is_empty() || key == "}" {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut v = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    other => v.push(other),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        labels.insert(key, v);
        if chars.peek() == Some(&'}') {
            break;
        }
    }
    Some((name.to_string(), labels, value))
}

/// Lines of `text` (a metrics scrape) naming `needle`, for failure messages.
pub fn lines_with(text: &Metrics, needle: &str) -> String {
    text.0
        .lines()
        .filter(|l| l.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn metric_lines_parse_with_escapes() {
    let (name, labels, v) =
        parse_sample(r#"x_total{a="1",b="q\"uote",c="back\\slash"} 42"#).expect("parses");
    assert_eq!(name, "x_total");
    assert_eq!(labels["a"], "1");
    assert_eq!(labels["b"], "q\"uote");
    assert_eq!(labels["c"], "back\\slash");
    assert_eq!(v, 42);
    let (name, labels, v) = parse_sample("y 3").expect("parses");
    assert_eq!((name.as_str(), labels.len(), v), ("y", 0, 3));
}
