//! The resolver against a real DNS exchange (a small server on loopback speaking the wire
//! protocol through hickory-proto), and the refresh rules with a table.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

use super::*;

type Zone = Arc<Mutex<HashMap<String, (Vec<IpAddr>, u32)>>>;

/// A DNS server on 127.0.0.1 answering A and AAAA queries from `zone` (name → addresses, TTL),
/// NXDOMAIN for names it does not have.
async fn dns_server(zone: Zone) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = sock.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::response(query.metadata.id, OpCode::Query);
            resp.metadata.recursion_desired = query.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            for q in &query.queries {
                resp.add_query(q.clone());
                let name = q
                    .name()
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                let found = zone.lock().unwrap().get(&name).cloned();
                let Some((addrs, ttl)) = found else {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                    continue;
                };
                for ip in addrs {
                    let rdata = match (ip, q.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                        _ => continue,
                    };
                    resp.add_answer(Record::from_rdata(q.name().clone(), ttl, rdata));
                }
            }
            if let Ok(bytes) = resp.to_vec() {
                let _ = sock.send_to(&bytes, peer).await;
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn the_node_resolver_returns_every_address_with_its_ttl() {
    let zone: Zone = Arc::default();
    zone.lock().unwrap().insert(
        "api.example.com".into(),
        (
            vec![
                "192.0.2.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
                "192.0.2.11".parse().unwrap(),
            ],
            30,
        ),
    );
    let (server, _task) = dns_server(zone).await;
    let lookup = SystemLookup::with_server(server).expect("resolver");
    let answer = lookup.lookup("api.example.com").await.expect("resolves");
    let want: Vec<IpAddr> = ["192.0.2.10", "192.0.2.11", "2001:db8::10"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(answer.addrs, want);
    assert!(
        answer.ttl <= Duration::from_secs(30) && answer.ttl > Duration::from_secs(20),
        "the record's TTL: {:?}",
        answer.ttl
    );
    let err = lookup
        .lookup("missing.example.com")
        .await
        .expect_err("NXDOMAIN");
    assert!(err.to_string().contains("missing.example.com"), "{err}");
}

/// A table whose answers the test changes, counting lookups.
#[derive(Default)]
struct Table {
    answers: Mutex<HashMap<String, Result<Answer, String>>>,
    lookups: Mutex<HashMap<String, usize>>,
}

impl Lookup for Table {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, DnsError>> + Send + 'a>> {
        *self.lookups.lock().unwrap().entry(name.into()).or_default() += 1;
        let r = self.answers.lock().unwrap().get(name).cloned();
        Box::pin(async move {
            match r {
                Some(Ok(a)) => Ok(a),
                Some(Err(reason)) => Err(DnsError::Lookup {
                    name: name.into(),
                    reason,
                }),
                None => Err(DnsError::Lookup {
                    name: name.into(),
                    reason: "NXDOMAIN".into(),
                }),
            }
        })
    }
}

fn answer(ips: &[&str], ttl: u64) -> Result<Answer, String> {
    Ok(Answer {
        addrs: ips.iter().map(|a| a.parse().unwrap()).collect(),
        ttl: Duration::from_secs(ttl),
    })
}

async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(start_paused = true)]
async fn answers_are_refreshed_by_ttl_kept_through_failures_and_forgotten_when_unwanted() {
    let table = Arc::new(Table::default());
    table
        .answers
        .lock()
        .unwrap()
        .insert("a.example.com".into(), answer(&["192.0.2.1"], 60));
    let dns = Dns::new(table.clone());
    let want: BTreeSet<String> = ["a.example.com".to_string()].into();
    dns.want(&want);
    until("the first answer", || {
        dns.answers().contains_key("a.example.com")
    })
    .await;
    assert!(dns.take_changed(), "a new answer is a change");
    assert!(!dns.take_changed(), "taken");

    // The record changes: seen once its TTL (60 s) has run out, not before.
    table
        .answers
        .lock()
        .unwrap()
        .insert("a.example.com".into(), answer(&["192.0.2.2"], 60));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        &*dns.answers()["a.example.com"],
        &["192.0.2.1".parse::<IpAddr>().unwrap()]
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    until("the new answer", || {
        dns.answers()["a.example.com"].first() == Some(&"192.0.2.2".parse().unwrap())
    })
    .await;
    assert!(dns.take_changed());

    // A failure keeps the last answer and is reported; retried after RETRY.
    table
        .answers
        .lock()
        .unwrap()
        .insert("a.example.com".into(), Err("SERVFAIL".into()));
    tokio::time::sleep(Duration::from_secs(61)).await;
    until("the failure", || !dns.failures().is_empty()).await;
    assert_eq!(dns.failures()[0].0, "a.example.com");
    assert!(
        dns.answers().contains_key("a.example.com"),
        "the last answer stays"
    );
    let before = table.lookups.lock().unwrap()["a.example.com"];
    tokio::time::sleep(RETRY + Duration::from_secs(1)).await;
    until("a retry", || {
        table.lookups.lock().unwrap()["a.example.com"] > before
    })
    .await;

    // A TTL of 0 is not a query per tick.
    table
        .answers
        .lock()
        .unwrap()
        .insert("a.example.com".into(), answer(&["192.0.2.3"], 0));
    tokio::time::sleep(RETRY + Duration::from_secs(1)).await;
    until("recovered", || dns.failures().is_empty()).await;
    let n = table.lookups.lock().unwrap()["a.example.com"];
    tokio::time::sleep(MIN_REFRESH * 3).await;
    let more = table.lookups.lock().unwrap()["a.example.com"] - n;
    assert!(
        (2..=3).contains(&more),
        "one lookup per MIN_REFRESH, not per tick: {more} in 3"
    );

    // No longer wanted: forgotten, and no more lookups.
    dns.want(&BTreeSet::new());
    assert!(dns.answers().is_empty());
    let n = table.lookups.lock().unwrap()["a.example.com"];
    tokio::time::sleep(MAX_REFRESH * 2).await;
    assert_eq!(table.lookups.lock().unwrap()["a.example.com"], n);
}
