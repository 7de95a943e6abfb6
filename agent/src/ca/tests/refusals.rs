//! Refusals the node check does not cover: what the CSR asks for beyond the identity, the
//! trust domain, tokens not bound to a pod, another cluster's requests, and configurations
//! that would serve without a check.

use super::*;

/// A CSR for a fresh key carrying `sans` (as the caller chooses, not as the agent would).
fn csr_with(sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).expect("CSR").der().to_vec()
}

fn uri(identity: &Identity) -> SanType {
    SanType::URI(identity.to_string().try_into().expect("IA5 URI"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csr_gets_the_requested_identity_and_nothing_else() {
    let w = world().await;
    let ca = w.client("agent-1");
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let sign = |csr: Vec<u8>, identity: Identity| {
        let ca = &ca;
        async move {
            ca.sign(&csr, &identity, Duration::from_secs(60))
                .await
                .map_err(|e| e.to_string())
        }
    };
    // Asking for web (on node-1) with a CSR for db (only on node-2).
    let swapped = sign(csr_with(vec![uri(&db)]), web.clone()).await;
    assert_refused(swapped, "InvalidArgument", "the CSR asks for");
    assert_eq!(w.denied("csr_identity_mismatch"), 1);
    // A DNS name on top of the identity: a workload must not get a certificate the agents
    // would take for the CA's own serving certificate.
    let dns = SanType::DnsName("ambit-ca.ambit-system.svc".try_into().expect("DNS name"));
    let extra = sign(csr_with(vec![uri(&web), dns]), web.clone()).await;
    assert_refused(extra, "InvalidArgument", "ambit-ca.ambit-system.svc");
    assert_eq!(w.denied("csr_rejected"), 1);
    // A CSR with no SAN gets exactly the identity asked for.
    let chain = sign(csr_with(Vec::new()), web.clone())
        .await
        .unwrap_or_else(|e| panic!("CSR without SANs: {e}"));
    assert_eq!(
        cert_uri_sans(&chain[0]).expect("SANs"),
        vec![web.to_string()]
    );
    // Another trust domain is not this CA's to sign, whatever runs on the node.
    let foreign = Identity::new("other.example", "shop", "web");
    let result = sign(csr_with(vec![uri(&foreign)]), foreign).await;
    assert_refused(result, "PermissionDenied", "is not in trust domain");
    assert_eq!(w.denied("trust_domain"), 1);
    assert_eq!(w.ca.authority.metrics().issued.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_not_bound_to_a_live_agent_pod_and_other_clusters_are_refused() {
    let w = world().await;
    let web = id("shop", "web");
    // The agent's account, but a token bound to no pod (a legacy Secret token).
    w.api.lock().tokens.insert(
        "unbound".into(),
        json!({
            "authenticated": true,
            "audiences": ["istio-ca"],
            "user": {"username": format!("system:serviceaccount:{AGENT_NS}:{AGENT_SA}")},
        }),
    );
    let unbound = ask(&w.client("unbound"), &web, Duration::from_secs(60)).await;
    assert_refused(unbound, "PermissionDenied", "not bound to a pod");
    assert_eq!(w.denied("no_pod_claims"), 1);
    // Bound to a pod the CA does not know (deleted before the request).
    w.api
        .token("gone", AGENT_NS, "ambit-gone", AGENT_SA, &["istio-ca"]);
    let gone = ask(&w.client("gone"), &web, Duration::from_secs(60)).await;
    assert_refused(gone, "PermissionDenied", "is not running on any node");
    assert_eq!(w.denied("caller_pod_unknown"), 1);
    // Not a ServiceAccount at all.
    w.api.lock().tokens.insert(
        "user".into(),
        json!({"authenticated": true, "audiences": ["istio-ca"], "user": {"username": "alice"}}),
    );
    let user = ask(&w.client("user"), &web, Duration::from_secs(60)).await;
    assert_refused(user, "Unauthenticated", "is not a ServiceAccount");
    // A request for another cluster.
    let other = w.client_of("agent-1", "east");
    let result = ask(&other, &web, Duration::from_secs(60)).await;
    assert_refused(result, "Unauthenticated", "is not this CA's cluster");
    assert_eq!(w.denied("unknown_cluster"), 1);
    assert_eq!(w.ca.authority.metrics().issued.get(), 0);
}

/// What is wrong, how to make it so, the flag the error must name.
type Case = (&'static str, fn(&mut ServeConfig), &'static str);

#[test]
fn configurations_that_would_skip_a_check_are_refused() {
    let dir = std::path::PathBuf::from("/nonexistent");
    let base = config(dir, Vec::new());
    base.validate()
        .unwrap_or_else(|e| panic!("the tests' own config: {e}"));
    let cases: [Case; 6] = [
        ("no audience", |c| c.audiences.clear(), "--token-audience"),
        (
            "blank audience",
            |c| c.audiences = vec![" ".into()],
            "--token-audience",
        ),
        (
            "no agent account",
            |c| c.agent_accounts.clear(),
            "--agent-account",
        ),
        ("no TLS name", |c| c.tls_names.clear(), "--tls-name"),
        (
            "zero default TTL",
            |c| c.default_cert_ttl = Duration::ZERO,
            "--default-cert-ttl",
        ),
        (
            "max below default",
            |c| c.max_cert_ttl = Duration::from_secs(1),
            "--max-cert-ttl",
        ),
    ];
    for (what, change, field) in cases {
        let mut cfg = base.clone();
        change(&mut cfg);
        let err = cfg.validate().map(|_| ()).expect_err(what).to_string();
        assert!(err.contains(field), "{what}: {err:?} names {field}");
    }
}
