//! A real Prometheus (Debian's `prometheus` package) run by the test inside one node's network
//! namespace, scraping the agents' `:15020/stats/prometheus` as Istio's scrape annotations ask,
//! and queried through its HTTP API (`/api/v1/query`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit::harness::{Node, Process};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Where Debian's `prometheus` package puts the server.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// One series of an instant query's answer.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The Prometheus server; killed (and reaped) on drop, also when the test panics.
pub struct Prometheus {
    node: Node,
    addr: SocketAddr,
    dir: PathBuf,
    process: Process,
}

impl Prometheus {
    /// Starts Prometheus in `node`'s netns with a 1 s scrape of `targets` (node IPs; the agents
    /// listen on 0.0.0.0:15020 there) at `/stats/prometheus`, storing its TSDB under `dir`.
    /// Returns once `/-/ready` answers 200.
    pub fn start(node: &Node, dir: &Path, targets: &[Ipv4Addr]) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS_BIN).exists(),
            "{PROMETHEUS_BIN} not found: this test needs Debian's `prometheus` package \
             (`apt-get install prometheus`; `cargo xtask test` installs it)"
        );
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let targets: Vec<String> = targets.iter().map(|ip| format!("'{ip}:15020'")).collect();
        // Istio's merged scrape config reads the agent's prometheus.io/path annotation:
        // /stats/prometheus on :15020.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             - job_name: ambit\n  metrics_path: /stats/prometheus\n  scrape_interval: 1s\n  \
             static_configs:\n  - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = node.run(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port in the node netns")
                .port()
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus.log");
        let mut cmd = node.command(PROMETHEUS_BIN);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let process = node.spawn(&mut cmd);
        let prom = Prometheus {
            node: node.clone(),
            addr,
            dir: dir.to_path_buf(),
            process,
        };
        let ready = crate::support::settled(
            || prom.get("/-/ready").ok().map(|(status, _)| status),
            |s| *s == Some(200),
        );
        assert_eq!(ready, Some(200), "Prometheus not ready\n{}", prom.log());
        prom
    }

    /// Its log (for failure messages).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("--- prometheus log ---\n{tail}")
    }

    /// GET `path` on its HTTP API from inside the node netns: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        let (addr, path) = (self.addr, path.to_string());
        self.node.run_async(move || async move {
            let io =
                tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| format!("connect {addr}: timed out"))?
                    .map_err(|e| format!("connect {addr}: {e}"))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            let req = http::Request::get(&path)
                .header(http::header::HOST, addr.to_string())
                .body(Empty::<bytes::Bytes>::new())
                .map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
                .await
                .map_err(|_| format!("GET {path}: timed out"))?
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        })
    }

    /// Runs an instant query; the answer's series, or the error Prometheus (or the
    /// connection) gave.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let qs = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let (status, body) = self.get(&format!("/api/v1/query?{qs}"))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}: {v}"));
        }
        let data = &v["data"];
        let result = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![serde_json::json!({"metric": {}, "value": data["result"]})],
            other => return Err(format!("unexpected result type {other:?}: {v}")),
        };
        result
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| format!("no value in {s}"))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.process.kill();
    }
}
