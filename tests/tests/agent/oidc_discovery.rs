//! OIDC discovery end to end: a server binary with `[oidc_discovery]` and
//! `ca.jwt_issuer`, JWT-SVIDs minted by the admin API and fetched by a
//! workload from an agent's Workload API, validated by PyJWT (a relying
//! party written by others) with nothing but the issuer URL and the HTTPS
//! listener's CA: discovery document, `jwks_uri` followed, signature,
//! `iss`, `aud`.
//!
//! Needs PyJWT from `tests/tests/agent/interop/requirements.txt` in
//! `<workspace>/.venv` (created by `scripts/test.sh`) or at `$SIGIL_PYTHON`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::Value;
use sigil_attestors::unix::UnixAttestor;
use sigil_proto::admin;
use sigil_proto::workload::JwtsvidRequest;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_tests::process::{ServerProcess, free_port};

use crate::workload_api::{my_uid, register, setup_on, with_header};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SIGIL_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "PyJWT is not installed: run ./scripts/test.sh (it creates .venv from \
         tests/tests/agent/interop/requirements.txt), or set SIGIL_PYTHON"
    );
    venv
}

/// A CA and a `localhost` serving certificate it signed, written to `dir`:
/// (CA file, certificate chain file, key file).
fn serving_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "OIDC test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.join("oidc-ca.pem"),
        dir.join("oidc.crt"),
        dir.join("oidc.key"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (ca_file, cert_file, key_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyjwt_validates_jwt_svids_with_keys_from_oidc_discovery() {
    let pki = tempfile::tempdir().unwrap();
    let (ca_file, cert_file, key_file) = serving_pki(pki.path());
    let port = free_port().unwrap();
    let issuer = format!("https://localhost:{port}/sigil");
    let server = ServerProcess::start_temp(&format!(
        "[ca]\njwt_issuer = \"{issuer}\"\n\n[oidc_discovery]\nbind_address = \"127.0.0.1:{port}\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\nissuer = \"{issuer}\"\nmax_age = \"1m\"\n",
        cert_file.display(),
        key_file.display()
    ))
    .unwrap();
    assert!(
        server.log().contains("OIDC discovery serving"),
        "{}",
        server.log()
    );

    // One token minted by the server through the admin API…
    let minted = server
        .admin()
        .await
        .unwrap()
        .mint_jwt_svid(admin::MintJwtSvidRequest {
            spiffe_id: "spiffe://example.org/minted".into(),
            audience: vec!["sts.example.com".into()],
            ttl: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    // …and one a workload fetches from its agent's Workload API.
    let s = setup_on(server, Arc::new(UnixAttestor::default()), |api| api).await;
    register(&s, "workload", &format!("unix:uid:{}", my_uid())).await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut api = SpiffeWorkloadApiClient::new(channel);
    let mut fetched = None;
    for _ in 0..400 {
        let r = api
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["sts.example.com".into()],
                spiffe_id: String::new(),
            }))
            .await;
        if let Ok(r) = r {
            fetched = Some(r.into_inner().svids.remove(0).svid);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let fetched = fetched.expect("the entry reached the agent");

    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/agent/interop/oidc_pyjwt.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(&issuer)
        .arg(&ca_file)
        .arg("sts.example.com")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{minted}\n{fetched}\n").as_bytes())
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "PyJWT relying party failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        s.server.log()
    );
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let discovery = &events[0];
    assert_eq!(discovery["event"], "discovery");
    assert_eq!(discovery["status"], 200);
    assert_eq!(discovery["cache_control"], "public, max-age=60");
    assert_eq!(discovery["document"]["issuer"], issuer.as_str());
    assert_eq!(
        discovery["document"]["jwks_uri"],
        format!("{issuer}/keys").as_str()
    );

    let tokens: Vec<&Value> = events.iter().filter(|e| e["event"] == "token").collect();
    assert_eq!(tokens.len(), 2, "{stdout}");
    for (t, sub) in tokens.iter().zip(["minted", "workload"]) {
        assert_eq!(t["sub"], format!("spiffe://example.org/{sub}").as_str());
        assert_eq!(t["iss"], issuer.as_str(), "iss is ca.jwt_issuer");
        assert_eq!(t["aud"], serde_json::json!(["sts.example.com"]));
        assert_eq!(t["wrong_audience"], "InvalidAudienceError");
        assert_eq!(t["wrong_issuer"], "InvalidIssuerError");
        assert_eq!(t["tampered"], "InvalidSignatureError");
    }
    let bundle = s.server.bundle().await.unwrap();
    assert!(
        bundle
            .jwt_authorities
            .iter()
            .any(|a| a.kid == tokens[0]["kid"].as_str().unwrap()),
        "the key PyJWT used is the trust domain's JWT key"
    );

    let other = events.last().unwrap();
    assert_eq!(other["event"], "other_requests");
    assert_eq!(other["unknown_path"], 404);
    assert_eq!(other["post_keys"], 405);
}

#[test]
fn a_discovery_issuer_other_than_ca_jwt_issuer_stops_the_server_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n[ca]\njwt_issuer = \"https://a.example.org\"\n\
             [oidc_discovery]\nbind_address = \"127.0.0.1:0\"\ncert_file = \"/x\"\nkey_file = \"/y\"\n\
             issuer = \"https://b.example.org\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(sigil_tests::process::binary("sigil-server").unwrap())
        .args(["run", "--config"])
        .arg(&config)
        .args(["--admin-socket"])
        .arg(dir.path().join("admin.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("differs from ca.jwt_issuer"),
        "a clear error: {stderr}"
    );
}
