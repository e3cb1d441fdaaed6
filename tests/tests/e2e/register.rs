//! Register an entry with the CLI; a workload fetches it with the `spiffe`
//! crate's client.

use std::time::Duration;

use sigil_tests::process::ServerOptions;

use crate::common::{Deployment, retry, td};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_workload_fetches_its_svids_with_the_spiffe_client() {
    let d = Deployment::start(&ServerOptions::default());
    d.register_me("web", &[]);
    // An entry for another uid must not reach this workload.
    d.server
        .create_entry(
            "spiffe://example.org/other",
            &d.agent_id,
            &["--selector", "unix:uid:4242424"],
        )
        .unwrap();

    let client = d.client().await;
    let svid = retry(Duration::from_secs(10), || client.fetch_x509_svid())
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");

    let context = client.fetch_x509_context().await.unwrap();
    assert_eq!(context.svids().len(), 1, "only the entry for this uid");
    let bundle = context.bundle_set().get(&td()).unwrap();
    assert_eq!(
        crate::common::verify(&svid, &bundle).unwrap(),
        "spiffe://example.org/web",
        "the SVID chains to the trust bundle"
    );

    let token = client.fetch_jwt_token(["db"], None).await.unwrap();
    let jwt = client.validate_jwt_token("db", &token).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
}
