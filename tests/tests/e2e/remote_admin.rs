//! The admin API over mTLS (`server.admin_bind_address`): callers holding
//! an admin X509-SVID manage the server from elsewhere, scoped by role;
//! everyone else is refused, and access ends when the admin entry goes.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_identity::tls::{
    SharedBundle, SpiffeServerVerifier, SvidResolver, authorize_id, certified_key, client_config,
};
use sigil_identity::{Bundle, SpiffeId, TrustDomain};
use sigil_proto::admin::{self as pb, admin_client::AdminClient};
use sigil_tests::process::{AgentProcess, NodeAttestation, ServerOptions, ServerProcess};
use tonic::transport::Channel;

use crate::common::{Deployment, retry};

/// The parent of entries whose SVIDs the tests mint directly: the server
/// (an admin entry under an agent grants only while that agent is present
/// and not banned).
const PARENT: &str = "spiffe://example.org/sigil/server";

fn mtls_options() -> ServerOptions {
    ServerOptions {
        admin_mtls: true,
        ..ServerOptions::default()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the CLI over mTLS with the SVID in `dir`; stdout, or the error text.
fn remote(server: &ServerProcess, dir: &Path, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["--svid-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = server.cli_remote(&all).unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(text(&out))
    }
}

/// Creates an entry for `spiffe://example.org/<name>` with `flags` and
/// mints an X509-SVID for it into `dir` (`ttl` if given); the entry id.
fn admin_identity(
    server: &ServerProcess,
    name: &str,
    flags: &[&str],
    dir: &Path,
    ttl: Option<&str>,
) -> String {
    let id = format!("spiffe://example.org/{name}");
    let mut args = vec!["--selector", "unix:uid:4242"];
    args.extend_from_slice(flags);
    let entry = server.create_entry(&id, PARENT, &args).unwrap();
    mint(server, &id, dir, ttl);
    entry
}

fn mint(server: &ServerProcess, id: &str, dir: &Path, ttl: Option<&str>) {
    let d = dir.to_str().unwrap();
    let mut args = vec!["x509", "mint", "--spiffe-id", id, "--write", d];
    if let Some(ttl) = ttl {
        args.extend(["--ttl", ttl]);
    }
    server.cli_ok(&args).unwrap();
}

/// Waits (at most 10 s) for an audit line naming `caller` and `needle`.
async fn audited(server: &ServerProcess, caller: &str, needle: &str) -> bool {
    let caller = format!("caller={caller}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if server
            .log()
            .lines()
            .any(|l| l.contains("sigil::audit") && l.contains(&caller) && l.contains(needle))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// An admin API client over mTLS holding the SVID in `dir`, or none.
async fn client(
    server: &ServerProcess,
    dir: &Path,
    with_svid: bool,
) -> Result<AdminClient<Channel>, String> {
    let pem = |f: &str| {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        let label = if f == "svid.key" {
            "PRIVATE KEY"
        } else {
            "CERTIFICATE"
        };
        sigil_identity::pem::decode_all(label, &text).unwrap()
    };
    let td = TrustDomain::new(&server.trust_domain).unwrap();
    let mut bundle = Bundle::new(td.clone());
    bundle.x509_authorities = pem("bundle.pem");
    let verifier = Arc::new(SpiffeServerVerifier::new(
        Arc::new(SharedBundle::new(bundle)),
        authorize_id(SpiffeId::server(&td)),
    ));
    let resolver = with_svid.then(|| {
        let key = certified_key(&pem("svid.pem"), &pem("svid.key")[0]).unwrap();
        Arc::new(SvidResolver::new(key))
    });
    let tls = client_config(verifier, resolver).unwrap();
    let address = server.admin_address.as_deref().unwrap();
    sigil_proto::channel::node_channel(address, Arc::new(tls))
        .await
        .map(AdminClient::new)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_workload_bans_an_agent_over_mtls_with_its_agent_svid() {
    let d = Deployment::start(&mtls_options());
    let server = &d.server;
    let victim_token = server.join_token().unwrap();
    let victim_agent = AgentProcess::start(
        &d._dir.path().join("victim-agent"),
        server,
        &NodeAttestation::JoinToken(victim_token),
    )
    .unwrap();
    let victim_agent_id = server
        .agent_ids()
        .unwrap()
        .into_iter()
        .find(|id| *id != d.agent_id)
        .unwrap();
    let uid = sigil_tests::process::current_uid().unwrap();
    server
        .create_entry(
            "spiffe://example.org/victim",
            &victim_agent_id,
            &["--selector", &format!("unix:uid:{uid}")],
        )
        .unwrap();
    let victim = spiffe::WorkloadApiClient::connect_to(victim_agent.endpoint())
        .await
        .unwrap();
    retry(Duration::from_secs(10), || victim.fetch_x509_svid())
        .await
        .unwrap();

    // This process's identity on the first agent is an admin.
    d.register_me("ops", &["--admin"]);
    let workload_api = d.agent.socket.to_str().unwrap();
    let banned = retry(Duration::from_secs(10), || async {
        let out = server
            .cli_remote(&[
                "--workload-api",
                workload_api,
                "agent",
                "ban",
                "--id",
                &victim_agent_id,
            ])
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(text(&out))
        }
    })
    .await
    .unwrap();
    assert_eq!(banned.trim(), format!("banned {victim_agent_id}"));

    // The banned agent's workloads lose their SVIDs.
    let denied = retry(Duration::from_secs(5), || async {
        match victim.fetch_x509_svid().await {
            Err(spiffe::WorkloadApiError::PermissionDenied(m)) => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(denied.is_ok(), "{denied:?}");
    assert!(
        audited(server, "spiffe://example.org/ops", "action=agent.ban").await,
        "no audit record names the caller:\n{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_scope_what_each_caller_may_do() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &mtls_options()).unwrap();
    let (reader, revoker, plain) = (
        dir.path().join("reader"),
        dir.path().join("revoker"),
        dir.path().join("plain"),
    );
    admin_identity(&server, "reader", &["--admin-role", "read"], &reader, None);
    admin_identity(
        &server,
        "revoker",
        &["--admin-role", "revoke"],
        &revoker,
        None,
    );
    admin_identity(&server, "plain", &[], &plain, None);
    let target = server
        .create_entry(
            "spiffe://example.org/web",
            PARENT,
            &["--selector", "unix:uid:7"],
        )
        .unwrap();

    // Read: the same output as over the socket; no deletion.
    let shown = ["--output", "json", "entry", "show", "--id", &target];
    assert_eq!(
        remote(&server, &reader, &shown).unwrap(),
        server.cli_ok(&shown).unwrap()
    );
    let err = remote(&server, &reader, &["entry", "delete", "--id", &target]).unwrap_err();
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(server.cli_ok(&["entry", "show", "--id", &target]).is_ok());

    // Revoke: deletes, but does not create.
    let err = remote(
        &server,
        &revoker,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/sneaky",
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:0",
        ],
    )
    .unwrap_err();
    assert!(err.contains("PermissionDenied"), "{err}");
    let listed = server
        .cli_json(&[
            "entry",
            "show",
            "--spiffe-id",
            "spiffe://example.org/sneaky",
        ])
        .unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let out = remote(&server, &revoker, &["entry", "delete", "--id", &target]).unwrap();
    assert_eq!(out.trim(), format!("deleted {target}"));
    let gone = server.cli(&["entry", "show", "--id", &target]).unwrap();
    assert!(!gone.status.success(), "{}", text(&gone));
    assert!(
        audited(
            &server,
            "spiffe://example.org/revoker",
            "action=entry.delete"
        )
        .await
    );

    // An SVID whose entry is not an admin: nothing, and the refusal is
    // audited under its SPIFFE ID.
    let err = remote(&server, &plain, &["entry", "count"]).unwrap_err();
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(
        audited(&server, "spiffe://example.org/plain", "permission denied").await,
        "{}",
        server.log()
    );
    assert!(audited(&server, "spiffe://example.org/revoker", "entry.create").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_that_are_expired_foreign_or_missing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &mtls_options()).unwrap();
    let fresh = dir.path().join("fresh");
    admin_identity(&server, "ops", &["--admin"], &fresh, None);
    assert_eq!(
        remote(&server, &fresh, &["entry", "count"]).unwrap().trim(),
        "1",
        "a valid admin SVID is accepted"
    );

    // The same identity, but an SVID that has expired.
    let expired = dir.path().join("expired");
    mint(&server, "spiffe://example.org/ops", &expired, Some("1s"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The handshake refuses it: the CLI exits non-zero.
    remote(&server, &expired, &["entry", "count"]).unwrap_err();

    // An admin SVID of another trust domain (with this server's bundle,
    // so the client itself trusts the server).
    let other = ServerProcess::start(
        &dir.path().join("other"),
        &ServerOptions {
            trust_domain: "other.org".into(),
            ..ServerOptions::default()
        },
    )
    .unwrap();
    let foreign = dir.path().join("foreign");
    other
        .create_entry(
            "spiffe://other.org/ops",
            "spiffe://other.org/sigil/agent/join_token/x",
            &["--selector", "unix:uid:1", "--admin"],
        )
        .unwrap();
    other
        .cli_ok(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://other.org/ops",
            "--write",
            foreign.to_str().unwrap(),
        ])
        .unwrap();
    std::fs::copy(fresh.join("bundle.pem"), foreign.join("bundle.pem")).unwrap();
    let err = remote(&server, &foreign, &["entry", "count"]).unwrap_err();
    assert!(err.starts_with("error:"), "{err}");

    // No client certificate at all.
    let refused = match client(&server, &fresh, false).await {
        Err(e) => Err(e),
        Ok(mut c) => c
            .count_entries(pb::CountEntriesRequest {})
            .await
            .map_err(|s| format!("{s:?}")),
    };
    assert!(refused.is_err(), "{refused:?}");
    // ... while the same client with the SVID is served.
    let mut c = client(&server, &fresh, true).await.unwrap();
    assert_eq!(
        c.count_entries(pb::CountEntriesRequest {})
            .await
            .unwrap()
            .into_inner()
            .count,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_loses_access_when_the_entry_goes_or_the_svid_expires() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &mtls_options()).unwrap();
    let svid = dir.path().join("ops");
    let entry = admin_identity(&server, "ops", &["--admin"], &svid, None);
    let mut c = client(&server, &svid, true).await.unwrap();
    c.count_entries(pb::CountEntriesRequest {}).await.unwrap();

    server.cli_ok(&["entry", "delete", "--id", &entry]).unwrap();
    let err = c
        .count_entries(pb::CountEntriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // An SVID that expires while its connection is open.
    admin_identity(&server, "ops2", &["--admin"], &svid, Some("4s"));
    let mut c = client(&server, &svid, true).await.unwrap();
    c.count_entries(pb::CountEntriesRequest {}).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let err = c
        .count_entries(pb::CountEntriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_rate_limited_per_caller_and_bodies_capped_per_method() {
    let dir = tempfile::tempdir().unwrap();
    let options = ServerOptions {
        extra: "[rate_limits]\nadmin_per_second = 0.01\nadmin_burst = 3\n".into(),
        ..mtls_options()
    };
    let server = ServerProcess::start(&dir.path().join("server"), &options).unwrap();
    let (ops, other) = (dir.path().join("ops"), dir.path().join("other"));
    admin_identity(&server, "ops", &["--admin"], &ops, None);
    admin_identity(&server, "other", &["--admin"], &other, None);
    let mut c = client(&server, &ops, true).await.unwrap();

    // An update larger than the 64 KiB cap of UpdateEntry is refused
    // before it is read (and counts as a call).
    let entry = pb::ListEntriesRequest::default();
    let mut listed = c.list_entries(entry).await.unwrap().into_inner().entries;
    let mut big = listed.remove(0);
    big.hint = "x".repeat(100 * 1024);
    let err = c
        .update_entry(pb::UpdateEntryRequest { entry: Some(big) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit"), "{err:?}");

    c.count_entries(pb::CountEntriesRequest {}).await.unwrap();
    let err = c
        .count_entries(pb::CountEntriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // Another caller has its own bucket.
    let mut c = client(&server, &other, true).await.unwrap();
    c.count_entries(pb::CountEntriesRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifting_a_ban_by_eviction_needs_the_admin_role() {
    let d = Deployment::start(&mtls_options());
    let server = &d.server;
    let dir = d._dir.path();
    let (revoker, admin) = (dir.join("revoker"), dir.join("admin"));
    admin_identity(
        server,
        "revoker",
        &["--admin-role", "revoke"],
        &revoker,
        None,
    );
    admin_identity(server, "boss", &["--admin-role", "admin"], &admin, None);
    server
        .cli_ok(&["agent", "ban", "--id", &d.agent_id])
        .unwrap();

    // Evicting deletes the record, and with it the ban: revoke may not.
    let refused = remote(server, &revoker, &["agent", "evict", "--id", &d.agent_id]);
    let err = refused.expect_err("a revoke caller lifted a ban by evicting");
    assert!(err.contains("needs admin"), "{err}");
    assert!(
        audited(server, "spiffe://example.org/revoker", "permission denied").await,
        "no audit record of the refusal:\n{}",
        server.log()
    );
    let agents = server.agent_ids().unwrap();
    assert!(agents.contains(&d.agent_id), "the banned agent was removed");

    let out = remote(server, &admin, &["agent", "evict", "--id", &d.agent_id]).unwrap();
    assert!(out.contains(&d.agent_id), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_svid_of_a_banned_node_is_refused() {
    let d = Deployment::start(&mtls_options());
    let server = &d.server;
    let dir = d._dir.path().join("on-node");
    let id = "spiffe://example.org/node-ops";
    server
        .create_entry(id, &d.agent_id, &["--selector", "unix:uid:4242", "--admin"])
        .unwrap();
    mint(server, id, &dir, None);
    remote(server, &dir, &["entry", "count"]).expect("the admin SVID works first");

    server
        .cli_ok(&["agent", "ban", "--id", &d.agent_id])
        .unwrap();
    let err = remote(server, &dir, &["entry", "count"])
        .expect_err("the admin SVID of a banned node still works");
    assert!(err.contains("holds no admin role"), "{err}");
}
