//! `/logging`: the log filter, read and changed at run time through the reload handle `main`
//! wires around the subscriber's `EnvFilter`, as Envoy's and ztunnel's admin `/logging` do:
//! `?level=<level>` sets the default level, `?<target>=<level>` one target's (e.g.
//! `ambit::proxy=debug`), `?reset` restores the filter the agent started with. Without a query it
//! shows the current filter.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use thiserror::Error;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The reload handle of the agent's filter layer (`main` builds the subscriber as
/// `registry().with(reload::Layer<EnvFilter>).with(fmt::layer())`).
pub type LogHandle = reload::Handle<EnvFilter, Registry>;

/// What `main` hands the agent: the reload handle and the filter it started with.
#[derive(Debug, Clone)]
pub struct LogReload {
    pub handle: LogHandle,
    /// The startup filter (`AMBIT_LOG` plus main's defaults): what `?reset` restores.
    pub startup: String,
}

/// The levels `/logging` accepts.
pub const LEVELS: &str = "trace|debug|info|warn|error|off";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LoggingError {
    #[error("/logging: unknown log level {level:?} for {key} (want {LEVELS})")]
    BadLevel { key: String, level: String },
    #[error("/logging: {target:?} is not a log target (want a module path such as ambit::proxy)")]
    BadTarget { target: String },
    #[error("/logging: the new filter {filter:?} does not parse: {reason}")]
    BadFilter { filter: String, reason: String },
    #[error("/logging: the subscriber is gone: {0}")]
    Reload(String),
}

/// The filter as directives: a default level, per-target levels, and whatever else the startup
/// filter said (span and field directives), kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Directives {
    default: Option<String>,
    targets: BTreeMap<String, String>,
    other: Vec<String>,
}

impl Directives {
    fn parse(filter: &str) -> Directives {
        let mut d = Directives {
            default: None,
            targets: BTreeMap::new(),
            other: Vec::new(),
        };
        for part in filter.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None if LevelFilter::from_str(part).is_ok() => d.default = Some(part.to_string()),
                Some((target, level)) if valid_target(target) && valid_level(level) => {
                    d.targets.insert(target.to_string(), level.to_string());
                }
                _ => d.other.push(part.to_string()),
            }
        }
        d
    }

    fn render(&self) -> String {
        let mut parts: Vec<String> = self.default.iter().cloned().collect();
        parts.extend(self.other.iter().cloned());
        parts.extend(self.targets.iter().map(|(t, l)| format!("{t}={l}")));
        parts.join(",")
    }
}

fn valid_level(level: &str) -> bool {
    LevelFilter::from_str(level).is_ok()
}

/// A Rust log target: a module path (`ambit::proxy::outbound`) or a crate name (`h2`).
fn valid_target(target: &str) -> bool {
    !target.is_empty()
        && target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
}

/// Reads and changes the agent's log filter.
#[derive(Debug)]
pub struct LogControl {
    handle: LogHandle,
    startup: Directives,
    current: Mutex<Directives>,
}

impl LogControl {
    pub fn new(reload: LogReload) -> LogControl {
        let startup = Directives::parse(&reload.startup);
        LogControl {
            handle: reload.handle,
            current: Mutex::new(startup.clone()),
            startup,
        }
    }

    /// The filter in effect, as the subscriber prints it.
    pub fn current(&self) -> Result<String, LoggingError> {
        self.handle
            .with_current(|f| f.to_string())
            .map_err(|e| LoggingError::Reload(e.to_string()))
    }

    /// Applies a `/logging` query (`level=debug&h2=warn`, `reset`). Every pair is checked
    /// before anything changes: a bad one changes nothing. Returns the filter now in effect.
    pub fn apply_query(&self, query: &str) -> Result<String, LoggingError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = current.clone();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let (key, value) = (key.trim(), value.trim().to_ascii_lowercase());
            if key == "reset" {
                next = self.startup.clone();
                continue;
            }
            if !valid_level(&value) {
                return Err(LoggingError::BadLevel {
                    key: key.to_string(),
                    level: value,
                });
            }
            if key == "level" {
                // Targets set by name keep their level, as a more specific directive does.
                next.default = Some(value);
            } else if valid_target(key) {
                next.targets.insert(key.to_string(), value);
            } else {
                return Err(LoggingError::BadTarget {
                    target: key.to_string(),
                });
            }
        }
        let filter = next.render();
        let parsed = EnvFilter::try_new(&filter).map_err(|e| LoggingError::BadFilter {
            filter: filter.clone(),
            reason: e.to_string(),
        })?;
        // reload rebuilds tracing's callsite interest cache, so `enabled!` sees the change at once.
        self.handle
            .reload(parsed)
            .map_err(|e| LoggingError::Reload(e.to_string()))?;
        *current = next;
        tracing::info!(filter = %filter, "log filter changed through /logging");
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_directives_round_trip_and_keep_what_they_do_not_understand() {
        let d = Directives::parse("info,kube_client::client::builder=off,[span{a=1}]=debug");
        assert_eq!(d.default.as_deref(), Some("info"));
        assert_eq!(
            d.targets
                .get("kube_client::client::builder")
                .map(String::as_str),
            Some("off")
        );
        assert_eq!(d.other, vec!["[span{a=1}]=debug".to_string()]);
        assert_eq!(
            d.render(),
            "info,[span{a=1}]=debug,kube_client::client::builder=off"
        );
    }

    #[test]
    fn targets_must_look_like_module_paths() {
        assert!(valid_target("ambit::proxy::outbound"));
        assert!(valid_target("h2"));
        assert!(!valid_target("a b"));
        assert!(!valid_target("x{y}"));
        assert!(!valid_target(""));
    }
}
