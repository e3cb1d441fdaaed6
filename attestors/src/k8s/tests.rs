//! cgroup fixtures of each node layout, and a fake kubelet (HTTPS, the
//! real `/pods` PodList shape).

use super::*;
use crate::https::{HttpsClient, Trust};
use serde_json::json;
use sigil_test_fakes::{self as testserver, FakeServer};
use std::path::Path;
use std::sync::Arc;

const POD_UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cgroup")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_runtime_and_driver_layout_yields_pod_and_container() {
    for name in [
        "v1-cgroupfs-docker.txt",
        "v1-systemd-containerd.txt",
        "v1-systemd-docker.txt",
        "v2-systemd-containerd.txt",
        "v2-systemd-crio.txt",
        "v2-cgroupfs-containerd.txt",
        "v2-kind-nested.txt",
        "v2-cgroupns-relative.txt",
    ] {
        assert_eq!(
            cgroup::parse(&fixture(name)),
            CgroupMatch::Container {
                pod_uid: POD_UID.into(),
                container_id: CID.into()
            },
            "{name}"
        );
    }
}

#[test]
fn conmon_host_processes_and_mixed_cgroups_yield_no_container() {
    assert_eq!(
        cgroup::parse(&fixture("v2-crio-conmon.txt")),
        CgroupMatch::PodOnly {
            pod_uid: POD_UID.into()
        }
    );
    assert_eq!(
        cgroup::parse(&fixture("v2-host-process.txt")),
        CgroupMatch::NotInPod
    );
    assert!(matches!(
        cgroup::parse(&fixture("v1-two-pods.txt")),
        CgroupMatch::Ambiguous(_)
    ));
    assert!(matches!(
        cgroup::parse(&fixture("v1-two-containers.txt")),
        CgroupMatch::Ambiguous(_)
    ));
}

#[test]
fn v1_hierarchies_mixing_pod_and_container_cgroups_are_ambiguous() {
    // Some hierarchies put the process in its pod's cgroup, others in a
    // container's: which container it runs in cannot be told.
    for name in [
        "v1-cgroupfs-mixed-pod-container.txt",
        "v1-systemd-mixed-pod-container.txt",
    ] {
        assert!(
            matches!(cgroup::parse(&fixture(name)), CgroupMatch::Ambiguous(_)),
            "{name}: {:?}",
            cgroup::parse(&fixture(name))
        );
    }
}

#[test]
fn pod_shaped_paths_outside_the_kubelet_layouts_yield_nothing() {
    // A user with a delegated systemd subtree can make these by hand and
    // move a process in, naming another pod's UID and container ID.
    for name in ["v2-forged-user-subtree.txt", "v2-forged-cgroupfs-shape.txt"] {
        assert_eq!(
            cgroup::parse(&fixture(name)),
            CgroupMatch::NotInPod,
            "{name}"
        );
    }
}

#[test]
fn garbage_cgroup_files_yield_nothing() {
    for text in [
        "",
        "no colons here",
        "0::/kubepods/podnot-a-uid/abc",
        "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/short",
        "\u{0}\u{1}:::::",
    ] {
        assert!(
            matches!(
                cgroup::parse(text),
                CgroupMatch::NotInPod | CgroupMatch::PodOnly { .. }
            ),
            "{text:?}"
        );
    }
}

/// The kubelet's `/pods`: a PodList with this node's pods (trimmed to
/// fields the real one has).
fn pod_list(with_container: bool) -> Vec<u8> {
    let statuses = if with_container {
        json!([{
            "name": "web",
            "state": {"running": {"startedAt": "2026-11-28T09:00:05Z"}},
            "ready": true,
            "restartCount": 0,
            "image": "registry.example/shop/web:1.4.2",
            "imageID": "registry.example/shop/web@sha256:4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1c2b3a4f5e",
            "containerID": format!("containerd://{CID}"),
            "started": true
        }])
    } else {
        json!([{
            "name": "web",
            "state": {"waiting": {"reason": "ContainerCreating"}},
            "ready": false,
            "restartCount": 0,
            "image": "registry.example/shop/web:1.4.2",
            "imageID": ""
        }])
    };
    serde_json::to_vec(&json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": [
            {
                "metadata": {
                    "name": "kube-proxy-8h2xk",
                    "namespace": "kube-system",
                    "uid": "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9",
                    "labels": {"k8s-app": "kube-proxy"}
                },
                "spec": {"serviceAccountName": "kube-proxy", "nodeName": "node-a", "containers": [{"name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.31.2"}]},
                "status": {"phase": "Running", "containerStatuses": [{"name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.31.2", "imageID": "", "containerID": "containerd://0000000000000000000000000000000000000000000000000000000000000001", "ready": true, "restartCount": 0}]}
            },
            {
                "metadata": {
                    "name": "web-5d8c7b9f4-q2w7e",
                    "generateName": "web-5d8c7b9f4-",
                    "namespace": "shop",
                    "uid": POD_UID,
                    "resourceVersion": "99811",
                    "creationTimestamp": "2026-11-28T09:00:00Z",
                    "labels": {"app": "web", "pod-template-hash": "5d8c7b9f4"},
                    "annotations": {"kubernetes.io/config.seen": "2026-11-28T09:00:00.000000000Z"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8c7b9f4", "uid": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "controller": true}]
                },
                "spec": {
                    "serviceAccountName": "web",
                    "nodeName": "node-a",
                    "containers": [{"name": "web", "image": "registry.example/shop/web:1.4.2"}],
                    "volumes": [{"name": "spiffe", "csi": {"driver": "csi.spiffe.io", "readOnly": true}}]
                },
                "status": {
                    "phase": if with_container { "Running" } else { "Pending" },
                    "qosClass": "Burstable",
                    "podIP": "10.244.1.9",
                    "containerStatuses": statuses
                }
            }
        ]
    }))
    .unwrap()
}

struct Node {
    kubelet: FakeServer,
    _proc: tempfile::TempDir,
    attestor: K8sAttestor,
}

/// A fake node: a `/proc` with process 4242 in the given cgroup file and a
/// fake kubelet trusted through its CA.
async fn node(cgroup_fixture: &str, attempts: u32) -> Node {
    let kubelet = testserver::start().await;
    kubelet.route("/pods", 200, pod_list(true));
    let proc = tempfile::tempdir().unwrap();
    std::fs::create_dir(proc.path().join("4242")).unwrap();
    std::fs::write(proc.path().join("4242/cgroup"), fixture(cgroup_fixture)).unwrap();
    let token = proc.path().join("token");
    std::fs::write(&token, "agent-token\n").unwrap();
    let config = K8sAttestorConfig {
        kubelet_url: kubelet.base_url.clone(),
        token_file: Some(token),
        node_name: Some("node-a".into()),
        poll_attempts: attempts,
        poll_interval: Duration::from_millis(50),
        proc_root: proc.path().to_owned(),
        ..K8sAttestorConfig::default()
    };
    let client = HttpsClient::new(Trust::Roots(vec![kubelet.ca_der.clone()])).unwrap();
    Node {
        kubelet,
        _proc: proc,
        attestor: K8sAttestor::new(config, client),
    }
}

fn has(set: &SelectorSet, s: &str) -> bool {
    set.contains(&Selector::parse(s).unwrap())
}

#[tokio::test]
async fn a_pod_container_gets_its_selectors_from_the_kubelet() {
    let n = node("v2-systemd-containerd.txt", 3).await;
    let got = n.attestor.attest(4242).await.unwrap();
    for s in [
        "k8s:ns:shop",
        "k8s:sa:web",
        "k8s:pod-name:web-5d8c7b9f4-q2w7e",
        &format!("k8s:pod-uid:{POD_UID}"),
        "k8s:pod-label:app:web",
        "k8s:pod-label:pod-template-hash:5d8c7b9f4",
        "k8s:container-name:web",
        "k8s:container-image:registry.example/shop/web:1.4.2",
        "k8s:node-name:node-a",
    ] {
        assert!(has(&got, s), "missing {s} in {got:?}");
    }
    assert_eq!(got.len(), 9);
    assert_eq!(
        n.kubelet.hits.lock().unwrap().as_slice(),
        &[("/pods".to_owned(), Some("Bearer agent-token".to_owned()))]
    );
}

#[tokio::test]
async fn a_new_container_is_waited_for_briefly() {
    let n = node("v1-cgroupfs-docker.txt", 20).await;
    n.kubelet.route("/pods", 200, pod_list(false));
    let routes = n.kubelet.routes.clone();
    let hits = n.kubelet.hits.clone();
    tokio::spawn(async move {
        // The kubelet lists the container after the attestor asked twice.
        while hits.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        routes
            .lock()
            .unwrap()
            .insert("/pods".into(), (200, pod_list(true)));
    });
    let got = n.attestor.attest(4242).await.unwrap();
    assert!(has(&got, "k8s:container-name:web"));
    assert!(n.kubelet.hits("/pods") >= 3);
}

#[tokio::test]
async fn a_container_never_listed_gets_nothing_after_bounded_polling() {
    let n = node("v1-systemd-containerd.txt", 3).await;
    n.kubelet.route("/pods", 200, pod_list(false));
    assert!(n.attestor.attest(4242).await.unwrap().is_empty());
    assert_eq!(n.kubelet.hits("/pods"), 3);
}

#[tokio::test]
async fn processes_outside_one_pod_get_nothing_and_the_kubelet_is_not_asked() {
    for f in [
        "v2-host-process.txt",
        "v1-two-pods.txt",
        "v2-crio-conmon.txt",
        "v1-cgroupfs-mixed-pod-container.txt",
    ] {
        let n = node(f, 3).await;
        assert!(n.attestor.attest(4242).await.unwrap().is_empty(), "{f}");
        assert_eq!(n.kubelet.hits("/pods"), 0, "{f}");
    }
}

#[tokio::test]
async fn a_pod_of_another_node_gets_nothing() {
    let mut n = node("v2-systemd-crio.txt", 1).await;
    n.attestor.config.node_name = Some("node-b".into());
    // cri-o reports container IDs as cri-o://<id>.
    let list = String::from_utf8(pod_list(true))
        .unwrap()
        .replace("containerd://9bca", "cri-o://9bca");
    n.kubelet.route("/pods", 200, list);
    assert!(n.attestor.attest(4242).await.unwrap().is_empty());
    n.attestor.config.node_name = Some("node-a".into());
    assert!(has(
        &n.attestor.attest(4242).await.unwrap(),
        "k8s:node-name:node-a"
    ));
}

#[tokio::test]
async fn the_kubelet_certificate_is_verified_unless_skipped() {
    let n = node("v2-systemd-containerd.txt", 1).await;
    let other = testserver::start().await;
    let wrong = K8sAttestor::new(
        n.attestor.config.clone(),
        HttpsClient::new(Trust::Roots(vec![other.ca_der.clone()])).unwrap(),
    );
    let err = wrong.attest(4242).await.unwrap_err();
    assert!(
        matches!(err, WorkloadAttestError::Unavailable { .. }),
        "{err}"
    );
    let insecure = K8sAttestor::new(
        n.attestor.config.clone(),
        HttpsClient::new(Trust::InsecureSkipVerify).unwrap(),
    );
    assert!(!insecure.attest(4242).await.unwrap().is_empty());
}

#[tokio::test]
async fn kubelet_refusals_and_gone_processes_are_errors() {
    let n = node("v2-systemd-containerd.txt", 1).await;
    n.kubelet.route("/pods", 403, &b"Forbidden"[..]);
    let err = n.attestor.attest(4242).await.unwrap_err();
    assert!(err.to_string().contains("nodes/pods"), "{err}");
    assert!(err.to_string().contains("nodes/proxy"), "{err}");
    assert_eq!(
        n.attestor.attest(999_999).await.unwrap_err(),
        WorkloadAttestError::Gone(999_999)
    );
}

const POD2_UID: &str = "7d1e2f3a-4b5c-4d6e-8f7a-9b0c1d2e3f4a";
const CID2: &str = "5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b";

/// [`pod_list`] with a second pod, `api`, as if it had just been created.
fn pod_list_with_api_pod() -> Vec<u8> {
    let mut list: serde_json::Value = serde_json::from_slice(&pod_list(true)).unwrap();
    list["items"].as_array_mut().unwrap().push(json!({
        "metadata": {"name": "api-6c9d8e7f5-x1y2z", "namespace": "shop", "uid": POD2_UID, "labels": {"app": "api"}},
        "spec": {"serviceAccountName": "api", "nodeName": "node-a", "containers": [{"name": "api", "image": "registry.example/shop/api:2.0.1"}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": "api", "image": "registry.example/shop/api:2.0.1", "imageID": "", "containerID": format!("containerd://{CID2}"), "ready": true, "restartCount": 0}]}
    }));
    serde_json::to_vec(&list).unwrap()
}

#[tokio::test]
async fn concurrent_attestations_share_one_kubelet_request() {
    let n = node("v2-systemd-containerd.txt", 3).await;
    // The kubelet is slow to answer, so every attestation below is waiting
    // for the pod list while the first request is still in flight.
    n.kubelet.set_delay(Duration::from_millis(300));
    let attestor = Arc::new(n.attestor);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let a = attestor.clone();
            tokio::spawn(async move { a.attest(4242).await })
        })
        .collect();
    for t in tasks {
        let got = t.await.unwrap().unwrap();
        assert!(has(&got, "k8s:container-name:web"), "{got:?}");
    }
    assert_eq!(n.kubelet.hits("/pods"), 1);
    // A later attestation within the list's age is answered from it too.
    assert!(has(
        &attestor.attest(4242).await.unwrap(),
        "k8s:pod-name:web-5d8c7b9f4-q2w7e"
    ));
    assert_eq!(n.kubelet.hits("/pods"), 1);
}

#[tokio::test]
async fn a_pod_created_after_the_list_was_cached_is_found() {
    let n = node("v2-systemd-containerd.txt", 3).await;
    std::fs::create_dir(n._proc.path().join("4343")).unwrap();
    std::fs::write(
        n._proc.path().join("4343/cgroup"),
        format!("0::/kubepods/besteffort/pod{POD2_UID}/{CID2}\n"),
    )
    .unwrap();
    assert!(has(&n.attestor.attest(4242).await.unwrap(), "k8s:sa:web"));
    assert_eq!(n.kubelet.hits("/pods"), 1);
    // The api pod starts after the list was cached: its process is not in
    // the cached list, so the list is asked for again, once.
    n.kubelet.route("/pods", 200, pod_list_with_api_pod());
    let got = n.attestor.attest(4343).await.unwrap();
    assert!(has(&got, "k8s:sa:api"), "{got:?}");
    assert!(has(&got, &format!("k8s:pod-uid:{POD2_UID}")), "{got:?}");
    assert_eq!(n.kubelet.hits("/pods"), 2);
    // Both are now answered from the refreshed list.
    assert!(has(&n.attestor.attest(4242).await.unwrap(), "k8s:sa:web"));
    assert!(has(&n.attestor.attest(4343).await.unwrap(), "k8s:sa:api"));
    assert_eq!(n.kubelet.hits("/pods"), 2);
}

#[tokio::test]
async fn a_pod_list_older_than_its_max_age_is_fetched_again() {
    let mut n = node("v2-systemd-containerd.txt", 1).await;
    n.attestor.config.pod_list_max_age = Duration::from_millis(200);
    n.kubelet.route("/pods", 200, pod_list(true));
    assert!(has(&n.attestor.attest(4242).await.unwrap(), "k8s:sa:web"));
    assert!(has(&n.attestor.attest(4242).await.unwrap(), "k8s:sa:web"));
    assert_eq!(n.kubelet.hits("/pods"), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The pod's labels changed meanwhile; the old list is not used.
    let relabelled = String::from_utf8(pod_list(true))
        .unwrap()
        .replace("\"app\":\"web\"", "\"app\":\"web-v2\"");
    n.kubelet.route("/pods", 200, relabelled);
    assert!(has(
        &n.attestor.attest(4242).await.unwrap(),
        "k8s:pod-label:app:web-v2"
    ));
    assert_eq!(n.kubelet.hits("/pods"), 2);
}

#[tokio::test]
async fn attestations_waiting_on_a_failed_request_share_its_error() {
    let n = node("v2-systemd-containerd.txt", 3).await;
    n.kubelet.route("/pods", 403, &b"Forbidden"[..]);
    n.kubelet.set_delay(Duration::from_millis(300));
    let attestor = Arc::new(n.attestor);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let a = attestor.clone();
            tokio::spawn(async move { a.attest(4242).await })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("HTTP 403"), "{err}");
    }
    // One request for all of them, not one after another behind it.
    assert_eq!(n.kubelet.hits("/pods"), 1);
    // A failure is not kept: the next attestation asks again.
    n.kubelet.set_delay(Duration::ZERO);
    n.kubelet.route("/pods", 200, pod_list(true));
    assert!(has(&attestor.attest(4242).await.unwrap(), "k8s:sa:web"));
    assert_eq!(n.kubelet.hits("/pods"), 2);
}
