//! The agent core against a real server (the server library, in this
//! process, on real sockets): attestation, entries arriving and leaving,
//! restart without re-attestation.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::{AgentTestServer as _, agent_config, wait_for};
use sigil_agent::config::AgentConfig;
use sigil_agent::session::Session;
use sigil_identity::clock::FakeClock;
use sigil_proto::admin;
use sigil_proto::node as node_pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_attests_receives_svids_and_restarts_without_reattesting() {
    let server = crate::common::start("");
    server.bundle_pem(&server.dir().join("bundle.pem")).await;
    let data = server.dir().join("agent");
    let token = server.token().await.unwrap();
    let agent = Session::start(agent_config(&server, &data, &token))
        .await
        .unwrap();
    let cache = agent.cache();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(agent.run(async {
        let _ = stop_rx.await;
    }));

    let agents = server
        .admin()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    let agent_id = agents[0].id.clone();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("agent.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the agent key is stored 0600");

    let entry = node_pb::Entry {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: agent_id.clone(),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    };
    let created = server
        .admin()
        .await
        .unwrap()
        .create_entries(admin::CreateEntriesRequest {
            entries: vec![entry],
        })
        .await
        .unwrap();
    let entry_id = created.into_inner().results[0]
        .entry
        .as_ref()
        .unwrap()
        .id
        .clone();
    assert!(
        wait_for(|| cache.svids().len() == 1).await,
        "the new entry's SVID arrives"
    );
    let svid = cache.svids().remove(0);
    assert_eq!(svid.entry.spiffe_id.as_str(), "spiffe://example.org/web");
    let bundle = cache.bundle().unwrap();
    sigil_identity::x509::verify_svid(&svid.chain, &bundle, std::time::SystemTime::now()).unwrap();

    server
        .admin()
        .await
        .unwrap()
        .delete_entries(admin::DeleteEntriesRequest {
            ids: vec![entry_id],
        })
        .await
        .unwrap();
    assert!(
        wait_for(|| cache.svids().is_empty()).await,
        "a deleted entry's SVID is dropped"
    );

    let _ = stop_tx.send(());
    run.await.unwrap().unwrap();

    // The token is spent: starting again works only because the agent
    // uses its stored SVID instead of attesting.
    let again = Session::start(agent_config(&server, &data, &token))
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cache = again.cache();
    let run = tokio::spawn(again.run(async {
        let _ = stop_rx.await;
    }));
    assert!(
        wait_for(|| cache.bundle().is_some()).await,
        "the restarted agent syncs with its stored SVID"
    );
    let agents = server
        .admin()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1, "no second attestation");
    let _ = stop_tx.send(());
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_agent_drops_every_identity_and_its_stored_svid() {
    let server = crate::common::start("");
    let agent = server.start_agent().await;
    let cache = agent.cache();
    let run = tokio::spawn(agent.run(std::future::pending()));
    assert!(wait_for(|| cache.bundle().is_some()).await);
    let id = server.agent_id().await;
    server
        .admin()
        .await
        .unwrap()
        .create_entries(admin::CreateEntriesRequest {
            entries: vec![node_pb::Entry {
                spiffe_id: "spiffe://example.org/w".into(),
                parent_id: id.clone(),
                selectors: vec!["unix:uid:1".into()],
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    assert!(wait_for(|| !cache.svids().is_empty()).await, "SVID issued");
    let stored = server.dir().join("agent").join("agent.pem");
    assert!(stored.exists());

    server
        .admin()
        .await
        .unwrap()
        .ban_agent(admin::AgentRequest { id })
        .await
        .unwrap();
    assert!(
        wait_for(|| cache.revoked().is_some()).await,
        "the agent saw the revocation"
    );
    assert!(cache.entries().is_empty() && cache.svids().is_empty());
    // Identities go the moment the revocation arrives; the stored SVID once
    // the agent's loops have stopped, just after.
    assert!(
        wait_for(|| !stored.exists()).await,
        "a restart must attest again"
    );
    // A join-token agent cannot attest again; it keeps running (serving
    // PermissionDenied) until it is stopped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!run.is_finished());
    run.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_renews_its_svid_at_half_life_and_keeps_working() {
    let server = crate::common::start("[agents]\nsvid_ttl = \"4s\"\n");
    let agent = server.start_agent().await;
    let cache = agent.cache();
    let run = tokio::spawn(agent.run(std::future::pending()));
    let mut admin_client = server.admin().await.unwrap();
    let first = admin_client
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents
        .remove(0);

    // Past the first SVID's expiry: the agent must have renewed (twice).
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let now = admin_client
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents
        .remove(0);
    assert_ne!(
        now.serial, first.serial,
        "the server pinned a renewed serial"
    );
    assert!(now.expires_at > first.expires_at);

    // And it still works: a new entry's SVID arrives.
    let entry = node_pb::Entry {
        spiffe_id: "spiffe://example.org/late".into(),
        parent_id: first.id.clone(),
        selectors: vec!["unix:uid:1".into()],
        ..Default::default()
    };
    admin_client
        .create_entries(admin::CreateEntriesRequest {
            entries: vec![entry],
        })
        .await
        .unwrap();
    assert!(
        wait_for(|| cache
            .svids()
            .iter()
            .any(|s| s.entry.spiffe_id.as_str() == "spiffe://example.org/late"))
        .await
    );
    run.abort();
}

/// x509pop with `insecure_bootstrap`: the agent attests, and when its
/// stored SVID has expired it attests again (x509pop allows it) as the same
/// agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_agent_reattests_after_its_svid_expired() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let pki_dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca.distinguished_name.push(DnType::CommonName, "Node CA");
    std::fs::write(
        pki_dir.path().join("ca.pem"),
        ca.self_signed(&ca_key).unwrap().pem(),
    )
    .unwrap();
    let node_key = KeyPair::generate().unwrap();
    let mut node = CertificateParams::default();
    node.distinguished_name.push(DnType::CommonName, "node-7");
    let node_cert = node
        .signed_by(&node_key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    std::fs::write(pki_dir.path().join("node.pem"), node_cert.pem()).unwrap();
    std::fs::write(pki_dir.path().join("node.key"), node_key.serialize_pem()).unwrap();

    let server = crate::common::start(&format!(
        "[agents]\nsvid_ttl = \"2s\"\n[node_attestors.x509pop]\nca_bundle = \"{}\"\n",
        pki_dir.path().join("ca.pem").display()
    ));
    let data = server.dir().join("agent");
    let config = AgentConfig::parse(&format!(
        "trust_domain = \"example.org\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\ninsecure_bootstrap = true\n\
         [node_attestor.x509pop]\ncertificate = \"{}\"\nkey = \"{}\"\n",
        server.addr,
        data.display(),
        pki_dir.path().join("node.pem").display(),
        pki_dir.path().join("node.key").display()
    ))
    .unwrap();
    // The agent's clock, moved past its SVID's expiry instead of sleeping.
    let clock = Arc::new(FakeClock::new(SystemTime::now()));
    let mut config = config;
    config.clock = clock.clone();
    Session::start(config.clone()).await.unwrap();
    let first = server
        .admin()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents
        .remove(0);
    assert!(
        first
            .id
            .starts_with("spiffe://example.org/sigil/agent/x509pop/")
    );

    clock.advance(Duration::from_millis(2500));
    let agent = Session::start(config)
        .await
        .expect("re-attests with x509pop");
    let again = server
        .admin()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, first.id, "the same node is the same agent");
    assert_ne!(again[0].serial, first.serial);
    let cache = agent.cache();
    let run = tokio::spawn(agent.run(std::future::pending()));
    assert!(
        wait_for(|| cache.bundle().is_some()).await,
        "the re-attested agent syncs"
    );
    run.abort();
}

/// JWT-SVIDs are cached per (entry, audience) until half their life; after
/// that the server is asked, and if it cannot answer the cached token is
/// served while it is still valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_are_cached_and_outlive_a_server_outage() {
    let mut server = crate::common::start("[ca]\njwt_svid_ttl = \"4s\"\n");
    server.bundle_pem(&server.dir().join("bundle.pem")).await;
    // The agent's clock: moved past half-life and expiry instead of sleeping.
    let clock = Arc::new(FakeClock::new(SystemTime::now()));
    let mut config = agent_config(
        &server,
        &server.dir().join("agent"),
        &server.token().await.unwrap(),
    );
    config.clock = clock.clone();
    let agent = Session::start(config).await.unwrap();
    let cache = agent.cache();
    let handle = agent.clone();
    let run = tokio::spawn(agent.run(std::future::pending()));
    let agent_id = server
        .admin()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents[0]
        .id
        .clone();
    let e = node_pb::Entry {
        spiffe_id: "spiffe://example.org/jwt".into(),
        parent_id: agent_id,
        selectors: vec!["unix:uid:1".into()],
        ..Default::default()
    };
    server
        .admin()
        .await
        .unwrap()
        .create_entries(admin::CreateEntriesRequest { entries: vec![e] })
        .await
        .unwrap();
    assert!(wait_for(|| !cache.entries().is_empty()).await);
    let entry = cache.entries().remove(0);
    let aud = vec!["db".to_string()];

    let t1 = handle.jwt_svid(&entry, &aud).await.unwrap();
    assert_eq!(handle.jwt_svid(&entry, &aud).await.unwrap(), t1, "cached");
    let other = handle
        .jwt_svid(&entry, &["other".to_string()])
        .await
        .unwrap();
    assert_ne!(other, t1, "cached per audience");

    clock.advance(Duration::from_millis(2300)); // past half-life
    server.stop_async().await.unwrap();
    let started = std::time::Instant::now();
    let t2 = handle.jwt_svid(&entry, &aud).await.unwrap();
    println!(
        "JWT-SVID served from cache during an outage after {:?}",
        started.elapsed()
    );
    assert_eq!(
        t2, t1,
        "the still-valid cached token is served while the server is down"
    );

    clock.advance(Duration::from_millis(2000)); // past expiry
    assert!(
        handle.jwt_svid(&entry, &aud).await.is_err(),
        "an expired token is never served"
    );
    run.abort();
}
