//! CA authority management for incident response (issue 15): the state
//! machine through the CLI with every refusal, a taint under a running
//! workload, revoke reaching every bundle stream, and two replicas.

use std::process::Output;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use sigil_identity::jws::{Alg, parse as parse_jws};
use sigil_tests::postgres;
use sigil_tests::process::{ServerOptions, ServerProcess};

use crate::common::{Deployment, leaf_facts, retry, td, verify};

fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got stdout {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn refused(server: &ServerProcess, args: &[&str], needle: &str) {
    let err = fails(&server.cli(args).unwrap());
    assert!(
        err.contains(needle),
        "{args:?}: stderr lacks {needle:?}:\n{err}"
    );
}

/// `authority <kind> show` as JSON: every authority.
fn show(server: &ServerProcess, kind: &str) -> Vec<Value> {
    server.cli_json(&["authority", kind, "show"]).unwrap()["authorities"]
        .as_array()
        .unwrap()
        .clone()
}

/// The ids of `kind`'s authorities in `state`.
fn ids(server: &ServerProcess, kind: &str, state: &str) -> Vec<String> {
    show(server, kind)
        .iter()
        .filter(|a| a["state"] == state)
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

fn step(server: &ServerProcess, kind: &str, verb: &str, id: &str) -> Value {
    server
        .cli_json(&["authority", kind, verb, "--id", id])
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_machine_through_the_cli_with_every_refusal_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &ServerOptions::default()).unwrap();
    for kind in ["x509", "jwt"] {
        let active = ids(&server, kind, "active");
        assert_eq!(active.len(), 1, "{kind}: one active authority at start");
        let old = active[0].clone();
        fn a<'a>(kind: &'a str, verb: &'a str, id: &'a str) -> Vec<&'a str> {
            vec!["authority", kind, verb, "--id", id]
        }

        refused(
            &server,
            &a(kind, "taint", "00ff"),
            &format!("no {kind} authority 00ff"),
        );
        refused(
            &server,
            &a(kind, "activate", &old),
            "only a prepared authority can be activated",
        );
        refused(
            &server,
            &a(kind, "taint", &old),
            "is the active authority and cannot be tainted",
        );
        refused(
            &server,
            &a(kind, "revoke", &old),
            "only a tainted authority can be revoked",
        );
        refused(
            &server,
            &["authority", kind, "prepare", "--server-id", "elsewhere"],
            "no replica elsewhere",
        );

        let prepared = server.cli_json(&["authority", kind, "prepare"]).unwrap();
        assert_eq!(prepared["state"], "prepared");
        let new = prepared["id"].as_str().unwrap().to_owned();
        refused(
            &server,
            &["authority", kind, "prepare"],
            "is already prepared",
        );
        refused(
            &server,
            &a(kind, "taint", &new),
            "only an old (no longer active) authority can be tainted",
        );

        assert_eq!(step(&server, kind, "activate", &new)["state"], "active");
        assert_eq!(ids(&server, kind, "old"), vec![old.clone()]);
        assert_eq!(step(&server, kind, "taint", &old)["state"], "tainted");
        refused(
            &server,
            &["authority", kind, "prepare"],
            &format!("{kind} authority {old} is tainted but not revoked"),
        );

        // A restart keeps every state.
        server.restart().unwrap();
        assert_eq!(ids(&server, kind, "tainted"), vec![old.clone()]);
        assert_eq!(ids(&server, kind, "active"), vec![new.clone()]);
        let bundle = server.bundle().await.unwrap();
        match kind {
            "x509" => assert_eq!(bundle.tainted_x509_authorities.len(), 1),
            _ => assert_eq!(bundle.tainted_jwt_kids, vec![old.clone()]),
        }

        assert_eq!(step(&server, kind, "revoke", &old)["state"], "revoked");
        refused(
            &server,
            &a(kind, "revoke", &old),
            "only a tainted authority can be revoked",
        );
        server.restart().unwrap();
        assert_eq!(ids(&server, kind, "revoked"), vec![old.clone()]);
        let bundle = server.bundle().await.unwrap();
        assert!(!bundle.has_taint());
        if kind == "jwt" {
            assert!(bundle.jwt_authority(&old).is_none());
        } else {
            assert_eq!(bundle.x509_authorities.len(), 1, "only the new CA is left");
        }
        // Text output names the replica and state.
        let text = server.cli_ok(&["authority", kind, "show"]).unwrap();
        assert!(text.contains("revoked") && text.contains(&new), "{text}");
    }
}

/// The SubjectKeyIdentifier (hex) of the CA that signed `svid`.
fn issuer(svid: &spiffe::X509Svid) -> String {
    sigil_identity::random::hex(&leaf_facts(svid).issuer_key_id)
}

fn kid(token: &str) -> String {
    parse_jws(token, Alg::ALL).unwrap().kid().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taint_replaces_a_running_workloads_svids_without_a_gap_and_revoke_reaches_every_stream() {
    let d = Deployment::start(&ServerOptions::default());
    d.register_me("tainted", &[]);
    let source = spiffe::X509Source::builder()
        .endpoint(d.agent.endpoint())
        .build()
        .await
        .unwrap();
    let jwt_source = spiffe::JwtSource::builder()
        .endpoint(d.agent.endpoint())
        .build()
        .await
        .unwrap();
    let client = d.client().await;
    let old = ids(&d.server, "x509", "active").remove(0);
    let old_kid = ids(&d.server, "jwt", "active").remove(0);
    assert_eq!(issuer(&source.svid().unwrap()), old);
    let token = client.fetch_jwt_token(["db"], None).await.unwrap();
    assert_eq!(kid(&token), old_kid);

    // Runbook: prepare, wait until the workload trusts the new CA, activate.
    let new = d
        .server
        .cli_json(&["authority", "x509", "prepare"])
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let new_kid = d.server.cli_json(&["authority", "jwt", "prepare"]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    retry(Duration::from_secs(10), || async {
        let n = source
            .try_bundle_for_trust_domain(&td())
            .unwrap()
            .authorities()
            .len();
        if n == 2 { Ok(()) } else { Err(n) }
    })
    .await
    .unwrap();
    step(&d.server, "x509", "activate", &new);
    step(&d.server, "jwt", "activate", &new_kid);
    // The agent's cached JWT-SVID is still the old key's.
    let cached = client.fetch_jwt_token(["db"], None).await.unwrap();
    assert_eq!(kid(&cached), old_kid, "cached until half-life");

    let tainted_at = Instant::now();
    step(&d.server, "x509", "taint", &old);
    step(&d.server, "jwt", "taint", &old_kid);
    // Every ~50 ms the source holds a valid SVID, until it is the new CA's.
    let mut checks = 0;
    loop {
        let svid = source.svid().expect("the source always holds an SVID");
        let bundle = source
            .try_bundle_for_trust_domain(&td())
            .expect("the source always holds the bundle");
        let facts = leaf_facts(&svid);
        assert!(facts.not_after > SystemTime::now(), "expired SVID held");
        verify(&svid, &bundle).unwrap_or_else(|e| panic!("held SVID does not verify: {e}"));
        checks += 1;
        if issuer(&svid) == new {
            break;
        }
        assert!(
            tainted_at.elapsed() < Duration::from_secs(30),
            "the workload still holds an SVID of the tainted CA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "taint: workload SVID replaced after {:?} ({checks} checks)",
        tainted_at.elapsed()
    );
    // The tainted root stays trusted until revoke.
    let roots = source.try_bundle_for_trust_domain(&td()).unwrap();
    assert_eq!(roots.authorities().len(), 2);
    // The JWT cache dropped the tainted token: a new fetch has the new kid.
    let token = retry(Duration::from_secs(10), || async {
        let t = client
            .fetch_jwt_token(["db"], None)
            .await
            .map_err(|e| e.to_string())?;
        if kid(&t) == new_kid {
            Ok(t)
        } else {
            Err(format!("kid {}", kid(&t)))
        }
    })
    .await
    .unwrap();
    assert_eq!(kid(&token), new_kid);

    // Revoke: the old root and key leave every bundle stream.
    step(&d.server, "x509", "revoke", &old);
    step(&d.server, "jwt", "revoke", &old_kid);
    retry(Duration::from_secs(10), || async {
        let n = source
            .try_bundle_for_trust_domain(&td())
            .unwrap()
            .authorities()
            .len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("X509Source: {n} roots"))
        }
    })
    .await
    .unwrap();
    retry(Duration::from_secs(10), || async {
        let set = jwt_source.bundle_set().map_err(|e| e.to_string())?;
        let b = set.get(&td()).ok_or("no JWT bundle")?;
        if b.find_jwt_authority(&old_kid).is_none() && b.find_jwt_authority(&new_kid).is_some() {
            Ok(())
        } else {
            Err("JwtSource still holds the old kid".to_owned())
        }
    })
    .await
    .unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(bundles.get(&td()).unwrap().authorities().len(), 1);
    // The workload's SVID still verifies against the bundle without the old root.
    let svid = source.svid().unwrap();
    verify(&svid, &source.try_bundle_for_trust_domain(&td()).unwrap()).unwrap();
    // The agent's own SVID was renewed too: it still syncs after revoke.
    d.register_me("after-revoke", &[]);
    retry(Duration::from_secs(10), || async {
        let ctx = client
            .fetch_x509_context()
            .await
            .map_err(|e| e.to_string())?;
        if ctx.svids().len() == 2 {
            Ok(())
        } else {
            Err(format!("{} SVIDs", ctx.svids().len()))
        }
    })
    .await
    .unwrap();
    source.shutdown().await;
    let audit = d.server.log();
    for action in [
        "authority.x509.taint",
        "authority.x509.revoke",
        "authority.jwt.taint",
    ] {
        assert!(audit.contains(action), "audit log lacks {action}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_show_both_and_server_id_is_honoured() {
    let Some(pg) = postgres::connection() else {
        return;
    };
    let db = postgres::fresh_database(&pg).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = ServerOptions::with_extra(&postgres::datastore_toml(&db));
    let a = ServerProcess::start(&dir.path().join("a"), &options).unwrap();
    let b = ServerProcess::start(&dir.path().join("b"), &options).unwrap();
    let server_id = |s: &ServerProcess| {
        s.cli_json(&["healthcheck"]).unwrap()["server_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (id_a, id_b) = (server_id(&a), server_id(&b));
    for kind in ["x509", "jwt"] {
        let all = show(&a, kind);
        let replicas: std::collections::BTreeSet<_> = all
            .iter()
            .map(|v| v["server_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            replicas,
            [id_a.clone(), id_b.clone()].into(),
            "{kind}: {all:?}"
        );
        // B's authority through A: refused with the replica to connect to.
        let b_active = show(&b, kind)
            .into_iter()
            .find(|v| v["server_id"] == id_b.as_str() && v["state"] == "active")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        refused(
            &a,
            &["authority", kind, "prepare", "--server-id", &id_b],
            &format!("connect to replica {id_b}"),
        );
        refused(
            &a,
            &["authority", kind, "taint", "--id", &b_active],
            &format!("connect to replica {id_b}"),
        );
        // --server-id naming the replica itself works.
        let p = b
            .cli_json(&["authority", kind, "prepare", "--server-id", &id_b])
            .unwrap();
        assert_eq!(p["server_id"], id_b.as_str());
        // A sees B's prepared authority.
        let seen = show(&a, kind)
            .iter()
            .any(|v| v["server_id"] == id_b.as_str() && v["state"] == "prepared");
        assert!(seen, "{kind}: A lists B's prepared authority");
    }
}
