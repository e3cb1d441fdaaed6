//! Per-SVID revocation end to end: `sigil-server x509 revoke` puts a
//! serial on its CA's CRL, the agent serves the CRL over the Workload API,
//! and the mTLS example refuses the revoked certificate while other SVIDs
//! of the same CA keep working.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_identity::SpiffeId;
use sigil_identity::tls::{
    SharedBundle, SpiffeServerVerifier, SvidResolver, authorize_id, certified_key, client_config,
};
use sigil_tests::process::{ServerOptions, example, free_port};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::common::{Deployment, retry};

const SERVER: &str = "spiffe://example.org/mtls/server";
const CLIENT: &str = "spiffe://example.org/mtls/client";
const OTHER: &str = "spiffe://example.org/mtls/other";

/// Hex serial as the server stores it: lowercase, no leading zeros.
fn norm(hex: &str) -> String {
    let h: String = hex
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let t = h.trim_start_matches('0');
    if t.is_empty() { "0".into() } else { t.into() }
}

/// A TLS client that presents one fixed SVID (captured once, never
/// rotated) and accepts only the example server.
struct PinnedClient {
    connector: tokio_rustls::TlsConnector,
    serial: String,
}

impl PinnedClient {
    fn new(svid: &spiffe::X509Svid, bundle: &spiffe::X509Bundle) -> Self {
        let chain: Vec<Vec<u8>> = svid
            .cert_chain()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect();
        let key = certified_key(&chain, svid.private_key().as_ref()).unwrap();
        let mut b =
            sigil_identity::Bundle::new(sigil_identity::TrustDomain::new("example.org").unwrap());
        b.x509_authorities = bundle
            .authorities()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect();
        let verifier = Arc::new(SpiffeServerVerifier::new(
            Arc::new(SharedBundle::new(b)),
            authorize_id(SERVER.parse::<SpiffeId>().unwrap()),
        ));
        let mut config = client_config(verifier, Some(Arc::new(SvidResolver::new(key)))).unwrap();
        config.alpn_protocols = vec![b"sigil-mtls-example".to_vec()];
        let cert = sigil_identity::x509::parse(&chain[0]).unwrap();
        Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            serial: sigil_identity::x509::serial_hex(&cert),
        }
    }

    /// One request in a new TLS session; the server's reply line.
    async fn request(&self, addr: &str) -> Result<String, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("sigil-mtls-example").unwrap();
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (read, mut write) = tokio::io::split(tls);
        write
            .write_all(b"ping\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        tokio::io::BufReader::new(read)
            .read_line(&mut reply)
            .await
            .map_err(|e| e.to_string())?;
        if reply.is_empty() {
            return Err("the server closed the connection".into());
        }
        Ok(reply)
    }
}

/// The CRLs of the agent's `FetchX509SVID` reply.
async fn served_crls(d: &Deployment) -> Vec<Vec<u8>> {
    let socket = d.agent.endpoint();
    let path = socket.strip_prefix("unix://").unwrap().to_owned();
    sigil_agent::workload_client::fetch_x509(Path::new(&path))
        .await
        .unwrap()
        .crl
}

/// (CRL number, revoked serials) of each CRL.
fn read_crls(crls: &[Vec<u8>]) -> Vec<(u64, Vec<String>)> {
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;
    crls.iter()
        .map(|der| {
            let (_, crl) = CertificateRevocationList::from_der(der).unwrap();
            let number = crl
                .crl_number()
                .map(|n| u64::try_from(n.clone()).unwrap())
                .expect("Sigil's CRLs carry a CRL number");
            let serials = crl
                .iter_revoked_certificates()
                .map(|r| norm(&sigil_identity::x509::serial_hex_of(r.raw_serial())))
                .collect();
            (number, serials)
        })
        .collect()
}

/// Waits until a CRL served over the Workload API lists `serial`; its
/// number and DER.
async fn crl_listing(d: &Deployment, serial: &str) -> (u64, Vec<u8>) {
    retry(Duration::from_secs(10), || async {
        let crls = served_crls(d).await;
        read_crls(&crls)
            .into_iter()
            .zip(crls)
            .find(|((_, serials), _)| serials.iter().any(|s| s == serial))
            .map(|((n, _), der)| (n, der))
            .ok_or_else(|| format!("{serial} on no served CRL"))
    })
    .await
    .unwrap()
}

fn openssl_verify(dir: &Path, d: &Deployment, der: &[u8]) -> String {
    let crl = dir.join("crl.der");
    let bundle = dir.join("bundle.pem");
    std::fs::write(&crl, der).unwrap();
    d.server.write_bundle(&bundle).unwrap();
    let out = Command::new("openssl")
        .args(["crl", "-inform", "DER", "-noout", "-in"])
        .arg(&crl)
        .arg("-CAfile")
        .arg(&bundle)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl crl: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_svid_is_refused_by_the_mtls_example_and_on_the_served_crl() {
    let d = Deployment::start(&ServerOptions::default());
    d.register_me("mtls/server", &[]);
    d.register_me("mtls/client", &[]);
    let other_entry = d.register_me("mtls/other", &[]);
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut server = Command::new(example("mtls").unwrap())
        .args([
            "--id", SERVER, "--allow", CLIENT, "--allow", OTHER, "server", "--listen", &addr,
        ])
        .env("SPIFFE_ENDPOINT_SOCKET", d.agent.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.starts_with("listening"), "{first}");

    // Both client SVIDs, captured once: these exact certificates are
    // presented from here on, whatever the agent re-issues.
    let workload = d.client().await;
    let ctx = retry(Duration::from_secs(10), || async {
        let c = workload
            .fetch_x509_context()
            .await
            .map_err(|e| e.to_string())?;
        if c.svids().len() == 3 {
            Ok(c)
        } else {
            Err("not all SVIDs yet".to_string())
        }
    })
    .await
    .unwrap();
    let bundle = ctx.bundle_set().get(&crate::common::td()).unwrap().clone();
    let pick = |id: &str| {
        ctx.svids()
            .iter()
            .find(|s| s.spiffe_id().to_string() == id)
            .unwrap()
            .clone()
    };
    let revoked = PinnedClient::new(&pick(CLIENT), &bundle);
    let kept = PinnedClient::new(&pick(OTHER), &bundle);
    retry(Duration::from_secs(10), || revoked.request(&addr))
        .await
        .unwrap();
    kept.request(&addr).await.unwrap();

    let started = Instant::now();
    let out = d
        .server
        .cli_ok(&[
            "x509",
            "revoke",
            "--serial",
            &revoked.serial,
            "--reason",
            "key-compromise",
        ])
        .unwrap();
    assert!(out.contains(&norm(&revoked.serial)), "{out}");
    // Handshakes every 50 ms until the revoked certificate is refused.
    let refused_after = loop {
        if revoked.request(&addr).await.is_err() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the revoked client SVID still accepted 2 s after `x509 revoke`"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "x509 revoke: the mTLS example refused the revoked SVID {:.0} ms after the CLI started",
        refused_after.as_secs_f64() * 1e3
    );
    // It stays refused; the other SVID of the same CA is still accepted.
    for _ in 0..5 {
        assert!(revoked.request(&addr).await.is_err());
        kept.request(&addr).await.unwrap();
    }

    // The CRL served over the Workload API: openssl parses and verifies it
    // against the CA, and it lists the serial.
    let dir = tempfile::tempdir().unwrap();
    let (first_number, der) = crl_listing(&d, &norm(&revoked.serial)).await;
    let text = openssl_verify(dir.path(), &d, &der);
    assert!(text.contains("verify OK"), "{text}");

    // `--entry` revokes the other entry's SVIDs: its serial joins the CRL,
    // whose number grows.
    let out = d
        .server
        .cli_ok(&["x509", "revoke", "--entry", &other_entry])
        .unwrap();
    assert!(out.contains(&norm(&kept.serial)), "{out}");
    let (second_number, der) = crl_listing(&d, &norm(&kept.serial)).await;
    assert!(
        second_number > first_number,
        "{second_number} > {first_number}"
    );
    assert!(
        read_crls(std::slice::from_ref(&der))[0]
            .1
            .contains(&norm(&revoked.serial)),
        "the first revocation stays on the CRL"
    );
    assert!(openssl_verify(dir.path(), &d, &der).contains("verify OK"));
    retry(Duration::from_secs(2), || async {
        match kept.request(&addr).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepted"),
        }
    })
    .await
    .unwrap();

    // An unknown serial: a clear error, non-zero exit.
    let out = d
        .server
        .cli(&["x509", "revoke", "--serial", "0123456789abcdef0123"])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("123456789abcdef0123"), "{stderr}");

    server.kill().ok();
    server.wait().ok();
    // The reader reaches EOF once the server is gone: every line is in.
    reader.join().unwrap();
    let seen: Vec<String> = lines.try_iter().collect();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("refused") && l.to_lowercase().contains("revoked")),
        "the server named the revocation when refusing: {seen:#?}"
    );
}
