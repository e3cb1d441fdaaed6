//! SPIFFE federation between Sigil deployments: bundle endpoints
//! (`https_spiffe` and `https_web`), polling, the push to agents, the
//! Workload API's federated bundles, mTLS across trust domains with the
//! example's verifiers, a CA rotation crossing over, withdrawal, and bad
//! bundles refused while the last good one stays.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sigil_tests::process::{
    AgentProcess, NodeAttestation, ServerOptions, ServerProcess, current_uid, example, free_port,
};

const TD1: &str = "td1.test";
const TD2: &str = "td2.test";
const TD3: &str = "td3.test";

/// One trust domain: its server (with a bundle endpoint) and one agent.
struct Domain {
    agent: AgentProcess,
    server: ServerProcess,
    agent_id: String,
}

/// A `[bundle_endpoint]` section on a free port; the TOML and the URL.
fn endpoint_toml(extra: &str) -> (String, String) {
    let port = free_port().unwrap();
    (
        format!(
            "[bundle_endpoint]\naddress = \"127.0.0.1:{port}\"\nrefresh_hint = \"1s\"\n{extra}\n"
        ),
        format!("https://127.0.0.1:{port}/"),
    )
}

fn relationship(td: &str, url: &str, profile: &str, bundle_file: Option<&Path>) -> String {
    let mut s = format!(
        "[[federation.federates_with]]\ntrust_domain = \"{td}\"\nbundle_endpoint_url = \"{url}\"\nprofile = \"{profile}\"\n"
    );
    if profile == "https_spiffe" {
        s.push_str(&format!(
            "endpoint_spiffe_id = \"spiffe://{td}/sigil/server\"\n"
        ));
    }
    if let Some(f) = bundle_file {
        s.push_str(&format!("bundle_file = \"{}\"\n", f.display()));
    }
    s
}

fn start_server(dir: &Path, td: &str, ca_ttl: Option<Duration>, extra: String) -> ServerProcess {
    ServerProcess::start(
        dir,
        &ServerOptions {
            trust_domain: td.into(),
            ca_ttl,
            agent_svid_ttl: ca_ttl.map(|t| t / 2),
            extra,
            ..ServerOptions::default()
        },
    )
    .unwrap()
}

fn with_agent(dir: &Path, server: ServerProcess) -> Domain {
    let token = server.join_token().unwrap();
    let agent = AgentProcess::start(dir, &server, &NodeAttestation::JoinToken(token)).unwrap();
    let agent_id = server.agent_ids().unwrap().remove(0);
    Domain {
        agent,
        server,
        agent_id,
    }
}

impl Domain {
    /// Registers `spiffe://<td>/<name>` for this test's uid, federating
    /// with `federates`.
    fn register(&self, name: &str, federates: &[&str]) {
        let selector = format!("unix:uid:{}", current_uid().unwrap());
        let mut args = vec!["--selector", selector.as_str()];
        for td in federates {
            args.extend(["--federates-with", td]);
        }
        self.server
            .create_entry(
                &format!("spiffe://{}/{name}", self.server.trust_domain),
                &self.agent_id,
                &args,
            )
            .unwrap();
    }
}

/// The server's bundle as a JWK Set file under its directory.
fn bundle_file(server: &ServerProcess) -> std::path::PathBuf {
    let path = server.dir().join("own-bundle.json");
    let jwks = server
        .cli_ok(&["bundle", "show", "--format", "jwks"])
        .unwrap();
    std::fs::write(&path, jwks).unwrap();
    path
}

/// The CA certificates (DER) of the server's own bundle.
fn own_authorities(server: &ServerProcess) -> BTreeSet<Vec<u8>> {
    let pem = server
        .cli_ok(&["bundle", "show", "--format", "pem"])
        .unwrap();
    sigil_identity::pem::decode_all("CERTIFICATE", &pem)
        .unwrap()
        .into_iter()
        .collect()
}

/// The X.509 authorities of `td` a workload of `agent` is given through
/// `FetchX509Bundles`; `None` when it is given no bundle of `td`.
fn workload_sees(
    rt: &tokio::runtime::Runtime,
    agent: &AgentProcess,
    td: &str,
) -> Option<BTreeSet<Vec<u8>>> {
    rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
            .await
            .ok()?;
        let bundles = client.fetch_x509_bundles().await.ok()?;
        let b = bundles.get(&spiffe::TrustDomain::new(td).ok()?)?;
        Some(
            b.authorities()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect(),
        )
    })
}

/// Waits up to `limit` for `f` to hold; how long it took.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

fn mtls_client(agent: &AgentProcess, addr: &str, id: &str, allow: &str) -> std::process::Output {
    Command::new(example("mtls").unwrap())
        .args(["--id", id, "--allow", allow, "client", "--connect", addr])
        .args(["--count", "1"])
        .env("SPIFFE_ENDPOINT_SOCKET", agent.endpoint())
        .output()
        .unwrap()
}

/// Two Sigil trust domains federated both ways over `https_spiffe`: a
/// workload of each does mTLS with the other; removing the relationship
/// withdraws the bundle. (A CA rotation in td2 reaching td1's workloads is
/// not asserted yet: see docs/federation.md, "Not done yet".)
#[test]
fn two_trust_domains_federate_over_https_spiffe() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // td1 starts with its endpoint only: td2's bundle does not exist yet.
    let (ep1, url1) = endpoint_toml("profile = \"https_spiffe\"");
    let mut server1 = start_server(&dir.path().join("s1"), TD1, None, ep1.clone());
    let td1_bundle = bundle_file(&server1);
    // td2 federates with td1 from the start.
    let (ep2, url2) = endpoint_toml("profile = \"https_spiffe\"");
    let fed2 = format!(
        "{ep2}\n[federation]\nmin_refresh = \"1s\"\n{}",
        relationship(TD1, &url1, "https_spiffe", Some(&td1_bundle))
    );
    let server2 = start_server(&dir.path().join("s2"), TD2, None, fed2);
    let td2_bundle = bundle_file(&server2);
    // td1 federates with td2, bootstrapped from td2's bundle file.
    let fed1 = format!(
        "\n[federation]\nmin_refresh = \"1s\"\n{}",
        relationship(TD2, &url2, "https_spiffe", Some(&td2_bundle))
    );
    let mut config = std::fs::read_to_string(server1.config()).unwrap();
    config.push_str(&fed1);
    std::fs::write(server1.config(), &config).unwrap();
    server1.restart().unwrap();
    let d1 = with_agent(&dir.path().join("a1"), server1);
    let d2 = with_agent(&dir.path().join("a2"), server2);
    d1.register("mtls/server", &[TD2]);
    d2.register("mtls/client", &[TD1]);
    let (server_id, client_id) = (
        format!("spiffe://{TD1}/mtls/server"),
        format!("spiffe://{TD2}/mtls/client"),
    );

    // Each workload is given the other trust domain's bundle.
    wait_for(
        Duration::from_secs(30),
        "td2's bundle at td1's workload",
        || workload_sees(&rt, &d1.agent, TD2).is_some(),
    );
    wait_for(
        Duration::from_secs(30),
        "td1's bundle at td2's workload",
        || workload_sees(&rt, &d2.agent, TD1).is_some(),
    );

    // mTLS across the federation, each side with Sigil's verifiers.
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut mtls_server = Command::new(example("mtls").unwrap())
        .args([
            "--id", &server_id, "--allow", &client_id, "server", "--listen", &addr,
        ])
        .env("SPIFFE_ENDPOINT_SOCKET", d1.agent.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = mtls_server.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.starts_with("listening"), "{first}");
    let out = mtls_client(&d2.agent, &addr, &client_id, &server_id);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("server={server_id}")), "{stdout}");
    let accepted = lines.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        accepted.contains(&format!("peer={client_id}")),
        "{accepted}"
    );
    // A peer of td2 the server does not allow is still refused.
    let wrong = mtls_client(
        &d2.agent,
        &addr,
        &client_id,
        &format!("spiffe://{TD1}/other"),
    );
    assert!(!wrong.status.success());

    // Removing the relationship (config, restart) withdraws the bundle.
    let mut d1 = d1;
    std::fs::write(d1.server.config(), config.replace(&fed1, "")).unwrap();
    d1.server.restart().unwrap();
    wait_for(
        Duration::from_secs(30),
        "td2's bundle withdrawn from td1's workload",
        || workload_sees(&rt, &d1.agent, TD2).is_none(),
    );
    mtls_server.kill().ok();
    mtls_server.wait().ok();
    drop(d2);
}

/// A CA certificate of `td` (URI SAN `spiffe://<td>`), DER.
fn ca_of(td: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{td}").as_str().try_into().unwrap(),
    )];
    p.self_signed(&key).unwrap().der().to_vec()
}

fn jwks(td: &str, cas: &[Vec<u8>], sequence: u64) -> Vec<u8> {
    let mut b = sigil_identity::Bundle::new(sigil_identity::TrustDomain::new(td).unwrap());
    b.x509_authorities = cas.to_vec();
    b.sequence = sequence;
    b.refresh_hint = Some(Duration::from_secs(1));
    b.to_jwks_bytes()
}

/// `https_web`: td2's endpoint serves a locally issued web certificate,
/// td1 checks it with the CA file option. A fake td3 endpoint then serves a
/// lower sequence, another trust domain's bundle and garbage: each is
/// refused and logged, and td1's workloads keep the last good bundle.
#[test]
fn https_web_federation_and_bad_bundles_are_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A web certificate for 127.0.0.1 from a local CA.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let web = dir.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(web.join("key.pem"), leaf_key.serialize_pem()).unwrap();

    // The fake td3 endpoint (its own local CA), serving a good bundle first.
    let fake = rt.block_on(sigil_test_fakes::start());
    let td3_ca = ca_of(TD3);
    fake.route("/bundle", 200, jwks(TD3, std::slice::from_ref(&td3_ca), 5));
    let mut roots = ca_cert.pem();
    roots.push_str(&sigil_identity::pem::encode("CERTIFICATE", &fake.ca_der));
    std::fs::write(web.join("roots.pem"), roots).unwrap();

    let (ep2, url2) = endpoint_toml(&format!(
        "profile = \"https_web\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        web.join("cert.pem").display(),
        web.join("key.pem").display()
    ));
    let server2 = start_server(&dir.path().join("s2"), TD2, None, ep2);
    let fed1 = format!(
        "[federation]\nmin_refresh = \"1s\"\nca_file = \"{}\"\n{}\n{}",
        web.join("roots.pem").display(),
        relationship(TD2, &url2, "https_web", None),
        relationship(TD3, &format!("{}/bundle", fake.base_url), "https_web", None),
    );
    let server1 = start_server(&dir.path().join("s1"), TD1, None, fed1);
    let d1 = with_agent(&dir.path().join("a1"), server1);
    d1.register("web", &[TD2, TD3]);

    // td2's bundle arrives over https_web, verified with the CA file.
    let td2_cas = own_authorities(&server2);
    wait_for(
        Duration::from_secs(30),
        "td2's bundle over https_web",
        || workload_sees(&rt, &d1.agent, TD2).as_ref() == Some(&td2_cas),
    );
    let good: BTreeSet<Vec<u8>> = [td3_ca.clone()].into();
    wait_for(Duration::from_secs(30), "td3's first bundle", || {
        workload_sees(&rt, &d1.agent, TD3).as_ref() == Some(&good)
    });

    let other_ca = ca_of("elsewhere.test");
    let bad: [(&str, Vec<u8>, &str); 3] = [
        (
            "a lower sequence",
            jwks(TD3, &[ca_of(TD3)], 4),
            "spiffe_sequence went back from 5 to 4",
        ),
        (
            "another trust domain's bundle",
            jwks(TD3, &[other_ca], 9),
            "serves another trust domain's bundle",
        ),
        (
            "garbage",
            b"<html>not a bundle</html>".to_vec(),
            "is not a SPIFFE bundle",
        ),
    ];
    for (what, body, logged) in bad {
        let hits = fake.hits("/bundle");
        fake.route("/bundle", 200, body);
        // Two more polls after the switch: the bad body was fetched.
        wait_for(Duration::from_secs(20), what, || {
            fake.hits("/bundle") >= hits + 2
        });
        let log = d1.server.log();
        assert!(
            log.contains(logged),
            "{what}: expected {logged:?} in the log:\n{log}"
        );
        assert_eq!(
            workload_sees(&rt, &d1.agent, TD3).as_ref(),
            Some(&good),
            "{what}: the last good bundle stays"
        );
    }
    drop(server2);
}
