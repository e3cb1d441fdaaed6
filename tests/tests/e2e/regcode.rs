//! Registration files: an entry applied from a file serves a workload, and
//! pruning it from the file takes the workload's SVID away.

use std::time::Duration;

use sigil_tests::process::ServerOptions;

use crate::common::{Deployment, retry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_an_applied_entry_ends_the_workloads_svid() {
    let d = Deployment::start(&ServerOptions::default());
    let uid = sigil_tests::process::current_uid().unwrap();
    let file = d.server.dir().join("team.toml");
    std::fs::write(
        &file,
        format!(
            "[[entry]]\nname = \"app\"\nspiffe_id = \"spiffe://example.org/from-file\"\nparent_id = \"{}\"\nselectors = [\"unix:uid:{uid}\"]\n",
            d.agent_id
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    d.server
        .cli_ok(&["entry", "apply", "--file", f, "--owner", "team"])
        .unwrap();
    let client = d.client().await;
    let svid = retry(Duration::from_secs(10), || client.fetch_x509_svid())
        .await
        .unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/from-file"
    );

    // The entry leaves the file; apply --prune deletes it.
    std::fs::write(&file, "# no entries any more\n").unwrap();
    let out = d
        .server
        .cli_ok(&["entry", "apply", "--file", f, "--owner", "team", "--prune"])
        .unwrap();
    assert!(out.contains("1 to delete"), "{out}");
    let denied = retry(Duration::from_secs(10), || async {
        match client.fetch_x509_svid().await {
            Err(spiffe::WorkloadApiError::PermissionDenied(m)) => Ok(m),
            other => Err(format!("still served: {other:?}")),
        }
    })
    .await;
    assert!(denied.is_ok(), "{denied:?}");
}
