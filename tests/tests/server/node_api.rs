//! The node API against the real server process over real sockets.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::{TestServerExt as _, assert_all, assert_revoked, csr, every_call};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sigil_identity::x509 as svid;
use sigil_identity::{SpiffeId, TrustDomain};
use sigil_proto::admin;
use sigil_proto::node as pb;
use sigil_tests::process::ServerProcess;
use sigil_tests::sim_agent::SimAgent;
use tonic::Code;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

#[tokio::test]
async fn attest_with_join_token_then_use_the_agent_svid() {
    let server = crate::start("");
    let token = server.token().await.unwrap();
    let agent = SimAgent::join(&server, &token).await.unwrap();
    assert!(
        agent
            .id
            .as_str()
            .starts_with("spiffe://example.org/sigil/agent/join_token/")
    );
    assert!(
        !agent.id.as_str().contains(&token),
        "the token never appears in the agent id"
    );
    let bundle = server.bundle().await.unwrap();
    assert_eq!(
        svid::verify_svid(&agent.chain, &bundle, std::time::SystemTime::now()).unwrap(),
        agent.id
    );
    let mut client = agent.client(&server).await.unwrap();
    let b = client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.sequence, bundle.sequence);
    assert!(!server.log().contains(&token), "the token is never logged");
}

#[tokio::test]
async fn join_token_reuse_and_expiry_are_refused() {
    let server = crate::start("");
    let token = server.token().await.unwrap();
    SimAgent::join(&server, &token).await.unwrap();
    let again = SimAgent::join(&server, &token).await.err().unwrap();
    assert_eq!(again.code(), Code::PermissionDenied, "{again:?}");

    let short = server
        .admin()
        .await
        .unwrap()
        .create_join_token(admin::CreateJoinTokenRequest {
            ttl: 1,
            alias: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = SimAgent::join(&server, &short).await.err().unwrap();
    assert_eq!(expired.code(), Code::PermissionDenied, "{expired:?}");
    let unknown = SimAgent::join(&server, "0123456789abcdef0123456789abcdef")
        .await
        .err()
        .unwrap();
    assert_eq!(unknown.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn concurrent_attestations_with_one_token_yield_exactly_one_agent() {
    let server = crate::start("");
    for _ in 0..3 {
        let token = server.token().await.unwrap();
        let attempts: Vec<_> = (0..8)
            .map(|_| Box::pin(SimAgent::join(&server, &token)))
            .collect();
        let results = join_all(attempts).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            ok, 1,
            "exactly one of 8 concurrent attestations with one token succeeds"
        );
    }
    let agents = server
        .admin()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 3);
}

/// Polls all futures concurrently on this task until every one is done.
async fn join_all<F: std::future::Future + Unpin>(mut futs: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut outputs: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if outputs[i].is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    Poll::Ready(v) => outputs[i] = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.unwrap()).collect()
}

struct NodePki {
    params: CertificateParams,
    key: KeyPair,
    pem_path: std::path::PathBuf,
}

fn node_pki(dir: &std::path::Path) -> NodePki {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params
        .distinguished_name
        .push(DnType::CommonName, "Node CA");
    let cert = params.self_signed(&key).unwrap();
    let pem_path = dir.join("node-ca.pem");
    std::fs::write(&pem_path, cert.pem()).unwrap();
    NodePki {
        params,
        key,
        pem_path,
    }
}

fn node_cert(pki: &NodePki, cn: &str) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    (
        p.signed_by(&key, &Issuer::from_params(&pki.params, &pki.key))
            .unwrap()
            .der()
            .to_vec(),
        key,
    )
}

async fn x509pop(
    server: &ServerProcess,
    leaf: &[u8],
    key: &KeyPair,
) -> Result<SimAgent, tonic::Status> {
    let agent =
        sigil_attestors::x509pop::X509PopAgent::new(vec![leaf.to_vec()], &key.serialize_der())
            .unwrap();
    SimAgent::attest(server, &agent).await
}

#[tokio::test]
async fn x509pop_attests_and_a_banned_node_cannot_reattest_until_evicted() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = node_pki(pki_dir.path());
    let extra = format!(
        "[node_attestors.x509pop]\nca_bundle = \"{}\"\n",
        pki.pem_path.display()
    );
    let server = crate::start(&extra);
    let (leaf, key) = node_cert(&pki, "node-1");
    let agent = x509pop(&server, &leaf, &key).await.unwrap();
    assert!(
        agent
            .id
            .as_str()
            .starts_with("spiffe://example.org/sigil/agent/x509pop/")
    );
    // x509pop nodes may attest again (e.g. after losing their SVID).
    let again = x509pop(&server, &leaf, &key).await.unwrap();
    assert_eq!(again.id, agent.id);

    let mut admin = server.admin().await.unwrap();
    admin
        .ban_agent(admin::AgentRequest {
            id: agent.id.to_string(),
        })
        .await
        .unwrap();
    let refused = x509pop(&server, &leaf, &key).await.err().unwrap();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("banned"), "{refused:?}");
    admin
        .evict_agent(admin::AgentRequest {
            id: agent.id.to_string(),
        })
        .await
        .unwrap();
    x509pop(&server, &leaf, &key)
        .await
        .expect("after eviction the node may attest again");

    // A certificate from another CA, and a wrong key, are refused.
    let other = node_pki(pki_dir.path().join("..").as_path());
    let (foreign, fkey) = node_cert(&other, "node-2");
    assert_eq!(
        x509pop(&server, &foreign, &fkey)
            .await
            .err()
            .unwrap()
            .code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn old_serial_after_renewal_is_refused_on_every_call() {
    let server = crate::start("");
    let agent = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .unwrap();
    let mut old_client = agent.client(&server).await.unwrap();
    let renewed = agent.renew(&mut old_client).await.unwrap();
    assert_ne!(renewed.serial, agent.serial);
    // Until the new SVID is used, the old one still works (renewal in flight).
    old_client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();
    let mut new_client = renewed.client(&server).await.unwrap();
    new_client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();
    // From now on the old serial is refused everywhere.
    let mut stale = agent.client(&server).await.unwrap();
    let results = every_call(&mut stale, "x").await;
    assert_all(&results, Code::PermissionDenied);
    // Superseded is not revoked: the agent just reconnects with its new SVID.
    assert_revoked(&results, false);
    new_client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn banned_agent_is_refused_on_every_call() {
    let server = crate::start("");
    let agent = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .unwrap();
    let mut client = agent.client(&server).await.unwrap();
    client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();
    server
        .admin()
        .await
        .unwrap()
        .ban_agent(admin::AgentRequest {
            id: agent.id.to_string(),
        })
        .await
        .unwrap();
    let results = every_call(&mut client, "x").await;
    assert_all(&results, Code::PermissionDenied);
    assert_revoked(&results, true);
}

/// Issue 17 item 5: the admin agent calls take only agent IDs; a workload's
/// ID is refused as malformed (naming the expected form), not looked up.
#[tokio::test]
async fn admin_agent_calls_refuse_ids_that_are_not_agent_ids() {
    let server = crate::start("");
    let mut admin = server.admin().await.unwrap();
    let req = || admin::AgentRequest {
        id: "spiffe://example.org/web".into(),
    };
    let refusals = [
        admin.get_agent(req()).await.unwrap_err(),
        admin.ban_agent(req()).await.unwrap_err(),
        admin.evict_agent(req()).await.unwrap_err(),
    ];
    for err in refusals {
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("/sigil/agent/"), "{err:?}");
    }
}

#[tokio::test]
async fn expired_agent_svid_is_refused_on_every_call() {
    let server = crate::start("[agents]\nsvid_ttl = \"2s\"\n");
    let agent = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .unwrap();
    let mut client = agent.client(&server).await.unwrap();
    client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    // The connection was verified while the SVID was valid; each call checks again.
    let results = every_call(&mut client, "x").await;
    assert_all(&results, Code::PermissionDenied);
    assert_revoked(&results, false);
}

#[tokio::test]
async fn calls_without_a_client_certificate_are_unauthenticated() {
    let server = crate::start("");
    let mut anon = server.anonymous().await.unwrap();
    assert_all(&every_call(&mut anon, "x").await, Code::Unauthenticated);
}

#[tokio::test]
async fn an_agent_never_receives_or_signs_another_agents_entries() {
    let server = crate::start("");
    let a = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .unwrap();
    let b = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .unwrap();
    let ea = server
        .entry("spiffe://example.org/a", &a.id, &["unix:uid:1"])
        .await;
    let eb = server
        .entry("spiffe://example.org/b", &b.id, &["unix:uid:2"])
        .await;

    let mut ca = a.client(&server).await.unwrap();
    let mut sync = ca
        .sync(pb::SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = sync.message().await.unwrap().unwrap();
    let Some(pb::sync_response::Event::Snapshot(s)) = first.event else {
        panic!("snapshot first")
    };
    assert!(s.full);
    assert_eq!(
        s.entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![ea.id.clone()]
    );

    let key = KeyPair::generate().unwrap();
    let results = ca
        .batch_new_x509_svid(pb::BatchNewX509SvidRequest {
            params: vec![
                pb::SvidParams {
                    entry_id: ea.id.clone(),
                    csr: csr(&key),
                },
                pb::SvidParams {
                    entry_id: eb.id.clone(),
                    csr: csr(&key),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].code, 0, "{:?}", results[0].message);
    assert_eq!(
        results[1].code,
        Code::PermissionDenied as i32,
        "one bad item does not fail the others"
    );
    assert!(results[1].svid.is_none());
    let jwt = ca
        .new_jwt_svid(pb::NewJwtSvidRequest {
            entry_id: eb.id.clone(),
            audience: vec!["x".into()],
        })
        .await;
    assert_eq!(jwt.err().unwrap().code(), Code::PermissionDenied);
    let ok = ca
        .new_jwt_svid(pb::NewJwtSvidRequest {
            entry_id: ea.id.clone(),
            audience: vec!["x".into()],
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().spiffe_id, "spiffe://example.org/a");

    // A new entry for b is not pushed to a; one for a is.
    server
        .entry("spiffe://example.org/b2", &b.id, &["unix:uid:3"])
        .await;
    let ea2 = server
        .entry("spiffe://example.org/a2", &a.id, &["unix:uid:4"])
        .await;
    let next = tokio::time::timeout(Duration::from_secs(5), sync.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match next.event {
        Some(pb::sync_response::Event::EntryUpsert(e)) => assert_eq!(e.id, ea2.id),
        other => panic!("expected a's new entry, got {other:?}"),
    }
}

#[tokio::test]
async fn a_csr_gets_only_what_the_entry_says() {
    let server = crate::start("");
    let agent = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .unwrap();
    let entry = server
        .entry("spiffe://example.org/web", &agent.id, &["unix:uid:1"])
        .await;
    let key = KeyPair::generate().unwrap();
    let mut greedy = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    greedy.subject_alt_names.push(SanType::URI(
        "spiffe://example.org/admin".try_into().unwrap(),
    ));
    greedy.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = greedy.serialize_request(&key).unwrap().der().to_vec();
    let mut client = agent.client(&server).await.unwrap();
    let r = client
        .batch_new_x509_svid(pb::BatchNewX509SvidRequest {
            params: vec![pb::SvidParams {
                entry_id: entry.id.clone(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    let chain = r.svid.unwrap().cert_chain;
    let leaf = svid::parse(&chain[0]).unwrap();
    assert_eq!(
        svid::check_leaf(&leaf).unwrap().as_str(),
        "spiffe://example.org/web"
    );
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names.len(), 1, "no extra SANs");
}

#[tokio::test]
async fn sync_pushes_deletions_and_resumes_from_a_revision() {
    let server = crate::start("");
    let agent = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .unwrap();
    let keep = server
        .entry("spiffe://example.org/keep", &agent.id, &["unix:uid:1"])
        .await;
    let gone = server
        .entry("spiffe://example.org/gone", &agent.id, &["unix:uid:2"])
        .await;
    let mut client = agent.client(&server).await.unwrap();
    let mut sync = client
        .sync(pb::SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = sync.message().await.unwrap().unwrap();
    let seen = first.revision;
    let mut admin = server.admin().await.unwrap();
    admin
        .delete_entries(admin::DeleteEntriesRequest {
            ids: vec![gone.id.clone()],
        })
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), sync.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        next.event,
        Some(pb::sync_response::Event::EntryRemoved(gone.id.clone()))
    );
    drop(sync);

    // Reconnect from the revision seen before the deletion: only the change.
    let mut resumed = client
        .sync(pb::SyncRequest {
            since_revision: seen,
        })
        .await
        .unwrap()
        .into_inner();
    let m = resumed.message().await.unwrap().unwrap();
    let Some(pb::sync_response::Event::Snapshot(s)) = m.event else {
        panic!("snapshot first")
    };
    assert!(!s.full);
    assert!(s.entries.is_empty());
    assert_eq!(s.removed, vec![gone.id.clone()]);
    let _ = keep;
}

#[tokio::test]
async fn node_alias_entries_reach_every_matching_agent() {
    let server = crate::start("");
    let mut admin = server.admin().await.unwrap();
    let token = admin
        .create_join_token(admin::CreateJoinTokenRequest {
            ttl: 0,
            alias: "spiffe://example.org/cluster/prod".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let agent = SimAgent::join(&server, &token).await.unwrap();
    let alias = SpiffeId::parse("spiffe://example.org/cluster/prod").unwrap();
    let e = server
        .entry("spiffe://example.org/api", &alias, &["unix:uid:7"])
        .await;
    let mut client = agent.client(&server).await.unwrap();
    let mut sync = client
        .sync(pb::SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::sync_response::Event::Snapshot(s)) = sync.message().await.unwrap().unwrap().event
    else {
        panic!()
    };
    assert_eq!(
        s.entries.iter().map(|x| x.id.clone()).collect::<Vec<_>>(),
        vec![e.id.clone()]
    );
    let _ = td();
}

#[tokio::test]
async fn attestation_is_rate_limited_per_source() {
    let server = crate::start("[rate_limits]\nattest_per_second = 0.001\nattest_burst = 2.0\n");
    for _ in 0..2 {
        SimAgent::join(&server, &server.token().await.unwrap())
            .await
            .unwrap();
    }
    let err = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

#[tokio::test]
async fn signing_is_rate_limited_per_agent() {
    let server = crate::start("[rate_limits]\nsigning_per_second = 0.001\nsigning_burst = 3.0\n");
    let agent = SimAgent::join(&server, &server.token().await.unwrap())
        .await
        .unwrap();
    let entry = server
        .entry("spiffe://example.org/web", &agent.id, &["unix:uid:1"])
        .await;
    let mut client = agent.client(&server).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let batch = |n: usize| pb::BatchNewX509SvidRequest {
        params: (0..n)
            .map(|_| pb::SvidParams {
                entry_id: entry.id.clone(),
                csr: csr(&key),
            })
            .collect(),
    };
    client.batch_new_x509_svid(batch(3)).await.unwrap();
    let err = client.batch_new_x509_svid(batch(1)).await.err().unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn admin_mutations_and_issuance_are_audited_without_secrets() {
    let mut server = crate::start("");
    let token = server.token().await.unwrap();
    let agent = SimAgent::join(&server, &token).await.unwrap();
    let entry = server
        .entry("spiffe://example.org/web", &agent.id, &["unix:uid:1"])
        .await;
    let mut client = agent.client(&server).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let csr_der = csr(&key);
    client
        .batch_new_x509_svid(pb::BatchNewX509SvidRequest {
            params: vec![pb::SvidParams {
                entry_id: entry.id.clone(),
                csr: csr_der.clone(),
            }],
        })
        .await
        .unwrap();
    client
        .new_jwt_svid(pb::NewJwtSvidRequest {
            entry_id: entry.id.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap();
    let mut admin = server.admin().await.unwrap();
    admin
        .delete_entries(admin::DeleteEntriesRequest {
            ids: vec![entry.id.clone()],
        })
        .await
        .unwrap();
    admin
        .ban_agent(admin::AgentRequest {
            id: agent.id.to_string(),
        })
        .await
        .unwrap();
    drop(client);
    drop(admin);
    server.stop_async().await.unwrap();

    let store =
        sigil_server::datastore::SledDatastore::open(server.dir().join("data/datastore")).unwrap();
    use sigil_server::datastore::Datastore;
    let events = store.list_audit(0, 1000).await.unwrap();
    let actions: Vec<&str> = events.iter().map(|(_, e)| e.action.as_str()).collect();
    for want in [
        "token.generate",
        "agent.attest",
        "entry.create",
        "svid.x509.issue",
        "svid.jwt.issue",
        "entry.delete",
        "agent.ban",
    ] {
        assert!(actions.contains(&want), "no {want} in {actions:?}");
    }
    let issue = events
        .iter()
        .find(|(_, e)| e.action == "svid.x509.issue")
        .unwrap()
        .1
        .clone();
    assert_eq!(issue.caller, agent.id.as_str());
    assert_eq!(issue.target, "spiffe://example.org/web");
    assert_eq!(issue.outcome, "ok");
    assert!(issue.expires_at.is_some());
    let ban = events
        .iter()
        .find(|(_, e)| e.action == "agent.ban")
        .unwrap()
        .1
        .clone();
    assert!(ban.caller.starts_with("uid:"));
    let everything = format!("{events:?}{}", server.log());
    assert!(
        !everything.contains(&token),
        "the join token never appears in audit or logs"
    );
    let csr_b64 = base64_std(&csr_der);
    assert!(
        !everything.contains(&csr_b64[..40]),
        "no CSR in audit or logs"
    );
    assert!(
        server.log().contains("sigil::audit"),
        "audit events are logged too"
    );
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
