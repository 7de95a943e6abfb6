//! Per-request matching against compiled routes: pure functions of a request and a route.

use super::StrMatch;
use crate::config::istio::common::StringMatch;

impl StrMatch {
    /// The compiled form of a configured match; None for `{}` (presence). A regex matches the
    /// whole value (RE2 full match, as Envoy's `safe_regex`).
    pub fn from_config(m: &StringMatch) -> Result<Option<StrMatch>, regex::Error> {
        Ok(match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), _, _) => Some(StrMatch::Exact(e.clone())),
            (None, Some(p), _) => Some(StrMatch::Prefix(p.clone())),
            (None, None, Some(r)) => {
                Some(StrMatch::Regex(regex::Regex::new(&format!("^(?:{r})$"))?))
            }
            (None, None, None) => None,
        })
    }
}
