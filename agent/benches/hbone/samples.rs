//! What one measurement of one path gives (a sample), and every sample of a path over the runs.

use crate::common::stats::median;

/// Which way a measurement's connections went, from the agents' counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// No agent saw them (the direct paths).
    Direct,
    /// Over HBONE: the client's node opened a pool stream for every connection.
    Hbone,
    /// Same node, handed over inside the agent: no pool stream, no TLS connection.
    Local,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Hbone => "HBONE",
            Route::Local => "in-process",
        }
    }
}

/// What every sample carries besides its figures.
#[derive(Debug, Clone)]
pub struct Meta {
    /// CPUs other processes kept busy meanwhile (noise indicator).
    pub others_cpu: f64,
    pub route: Route,
    /// Failed connections or requests, or counters that show the connections did not take the
    /// intended path.
    pub problem: Option<String>,
}

/// The path's agents' CPU per unit (connection, GB, request).
#[derive(Debug, Clone, Copy)]
pub struct AgentCpu {
    /// The client node's agent; on a same-node path the one agent, both ends.
    pub client: f64,
    /// The server node's agent; `None` when one agent serves both ends.
    pub server: Option<f64>,
}

impl AgentCpu {
    pub fn total(self) -> f64 {
        self.client + self.server.unwrap_or(0.0)
    }

    /// `c + s = t`, or `t (one agent)`, with `prec` decimals.
    pub fn text(self, prec: usize) -> String {
        match self.server {
            Some(s) => format!(
                "{:.prec$} + {s:.prec$} = {:.prec$}",
                self.client,
                self.total()
            ),
            None => format!("{:.prec$} (one agent)", self.client),
        }
    }
}

/// One connection-rate run of one path.
#[derive(Debug, Clone)]
pub struct ConnSample {
    pub rate: f64,
    /// Connect → 1 byte echoed, per connection.
    pub p50_us: f64,
    pub p99_us: f64,
    /// HBONE (TLS) connections the client's node opened per app connection (agent paths).
    pub hbone_conns_per_conn: Option<f64>,
    /// Agent CPU µs per connection (agent paths).
    pub agent_cpu_us: Option<AgentCpu>,
    pub meta: Meta,
}

/// One throughput run of one path (one or several streams at once).
#[derive(Debug, Clone)]
pub struct TputSample {
    /// 10^9 bytes per second, all streams together.
    pub gbps: f64,
    /// Agent CPU seconds per GB (10^9 bytes).
    pub agent_cpu_s_per_gb: Option<AgentCpu>,
    pub meta: Meta,
}

/// One h2load run of one path: HTTP/1.1 keep-alive requests over a fixed number of connections.
#[derive(Debug, Clone)]
pub struct HttpSample {
    pub req_per_s: f64,
    /// Requests h2load completed in the timed part.
    pub requests: u64,
    /// Agent CPU µs per request (agent paths; the warm-up's requests are in the CPU, not in the
    /// count, so this slightly overstates).
    pub agent_cpu_us: Option<AgentCpu>,
    /// The server node's agent served the requests at L7 (destination-side HTTP).
    pub dest_l7: Option<bool>,
    pub meta: Meta,
}

/// One latency run of one path: round trips of `AMBIT_BENCH_PING_BYTES` on long-lived connections.
#[derive(Debug, Clone)]
pub struct LatSample {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub meta: Meta,
}

/// Every sample of one path, per measurement.
#[derive(Debug)]
pub struct PathResults {
    pub letter: char,
    pub label: &'static str,
    /// One agent serves both ends (the same-node path).
    pub one_agent: bool,
    /// New connections, `AMBIT_BENCH_CONCURRENCY` in flight.
    pub conn: Vec<ConnSample>,
    /// New connections, one at a time.
    pub conn_seq: Vec<ConnSample>,
    /// One stream.
    pub tput: Vec<TputSample>,
    /// `AMBIT_BENCH_STREAMS` streams at once.
    pub tput_par: Vec<TputSample>,
    /// HTTP over one connection.
    pub http_one: Vec<HttpSample>,
    /// HTTP over `AMBIT_BENCH_HTTP_CONNS` connections.
    pub http_many: Vec<HttpSample>,
    pub lat: Vec<LatSample>,
}

impl PathResults {
    pub fn new(letter: char, label: &'static str, one_agent: bool) -> Self {
        PathResults {
            letter,
            label,
            one_agent,
            conn: Vec::new(),
            conn_seq: Vec::new(),
            tput: Vec::new(),
            tput_par: Vec::new(),
            http_one: Vec::new(),
            http_many: Vec::new(),
            lat: Vec::new(),
        }
    }

    /// Every sample's meta, in measurement order.
    pub fn metas(&self) -> Vec<&Meta> {
        let c = self.conn.iter().chain(&self.conn_seq).map(|s| &s.meta);
        let t = self.tput.iter().chain(&self.tput_par).map(|s| &s.meta);
        let h = self.http_one.iter().chain(&self.http_many).map(|s| &s.meta);
        let l = self.lat.iter().map(|s| &s.meta);
        c.chain(t).chain(h).chain(l).collect()
    }

    pub fn problems(&self) -> Vec<&str> {
        self.metas()
            .into_iter()
            .filter_map(|m| m.problem.as_deref())
            .collect()
    }

    /// How many measurements took each route.
    pub fn routes(&self) -> Vec<(Route, usize)> {
        let metas = self.metas();
        [Route::Direct, Route::Hbone, Route::Local]
            .into_iter()
            .map(|r| (r, metas.iter().filter(|m| m.route == r).count()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// The median of `f` over `v`; `None` without samples or when `f` gives NaN ("not measured").
pub fn med<T>(v: &[T], f: impl Fn(&T) -> f64) -> Option<f64> {
    median(v.iter().map(f)).filter(|x| !x.is_nan())
}

/// The median agent CPU of samples, side by side (each side's own median).
pub fn med_cpu<T>(v: &[T], f: impl Fn(&T) -> Option<AgentCpu>) -> Option<AgentCpu> {
    let client = med(v, |s| f(s).map_or(f64::NAN, |c| c.client))?;
    let server = med(v, |s| f(s).and_then(|c| c.server).unwrap_or(f64::NAN));
    Some(AgentCpu { client, server })
}
