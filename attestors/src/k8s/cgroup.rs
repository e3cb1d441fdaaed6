//! Pod UID and container ID from `/proc/<pid>/cgroup`.
//!
//! The kubelet puts every container in a cgroup under its pod's cgroup, and
//! names both after fixed patterns (see the fixtures under
//! `attestors/tests/fixtures/cgroup/` for each layout):
//!
//! - cgroupfs driver: `/kubepods[/<qos>]/pod<uid>/<container-id>`;
//! - systemd driver: `/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid with _ for ->.slice/<runtime>-<container-id>.scope`,
//!   where the runtime prefix is `cri-containerd`, `crio` or `docker`;
//! - cgroup v1 repeats the path once per hierarchy (`id:controllers:path`),
//!   cgroup v2 has one line `0::path`;
//! - seen from inside a cgroup namespace the path is relative and may start
//!   with `/..` segments;
//! - everything above the pod's cgroup must be part of those layouts, so a
//!   pod-shaped path built by hand elsewhere (a user's delegated subtree)
//!   does not count.
//!
//! Parsing is pure. A process whose lines name two different pods or two
//! different containers is [`CgroupMatch::Ambiguous`] and gets no `k8s`
//! selectors, and so is one whose cgroup v1 hierarchies put it in a
//! container's cgroup in some lines and only in the pod's in others: the
//! kubelet puts a container's processes in the container's cgroup in every
//! hierarchy, so such a mix was made by someone else and says nothing
//! reliable. A process in a pod's cgroup but in no container's in every
//! line (e.g. cri-o's `conmon`) is [`CgroupMatch::PodOnly`].

/// What the cgroup file says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMatch {
    /// No pod cgroup at all: not a Kubernetes workload.
    NotInPod,
    /// In the pod's cgroup but no container's.
    PodOnly { pod_uid: String },
    /// In exactly one container of exactly one pod.
    Container {
        pod_uid: String,
        container_id: String,
    },
    /// The lines disagree; nothing can be said.
    Ambiguous(&'static str),
}

/// Whether `s` looks like a pod UID: a UUID, or the 32 hex digits of a
/// static pod's config hash.
fn is_pod_uid(s: &str) -> bool {
    (s.len() == 36 || s.len() == 32) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The pod UID named by one path segment, if it is a pod cgroup.
fn pod_uid(segment: &str) -> Option<String> {
    // cgroupfs: pod<uid>
    if let Some(uid) = segment.strip_prefix("pod") {
        return is_pod_uid(uid).then(|| uid.to_ascii_lowercase());
    }
    // systemd: [<prefix>-]kubepods[-<qos>]-pod<uid_with_underscores>.slice
    let stem = segment.strip_suffix(".slice")?;
    if !stem.contains("kubepods") {
        return None;
    }
    let (_, uid) = stem.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    is_pod_uid(&uid).then(|| uid.to_ascii_lowercase())
}

/// Whether `segment`, above a pod's cgroup (`pod`), is where the kubelet's
/// layouts put it: the `kubepods` root and QoS levels (cgroupfs), a parent
/// slice (systemd names every slice after its parent: `a.slice` holds
/// `a-b.slice`), or a step out of a cgroup namespace. Anything else (such
/// as a user's delegated `user@1000.service` subtree, where a pod-shaped
/// path could be made by hand) means the path is not the kubelet's.
fn kubelet_ancestor(segment: &str, pod: &str) -> bool {
    match segment {
        "" | ".." | "kubepods" | "burstable" | "besteffort" | "guaranteed" => true,
        _ => match (segment.strip_suffix(".slice"), pod.strip_suffix(".slice")) {
            (Some(parent), Some(pod)) => pod
                .strip_prefix(parent)
                .is_some_and(|rest| rest.starts_with('-')),
            _ => false,
        },
    }
}

/// The container ID named by one path segment, if it is a container cgroup.
fn container_id(segment: &str) -> Option<String> {
    let id = match segment.strip_suffix(".scope") {
        Some(stem) => {
            if stem.starts_with("crio-conmon-") {
                return None; // cri-o's monitor process, not the container
            }
            ["cri-containerd-", "crio-", "docker-", "containerd-"]
                .iter()
                .find_map(|p| stem.strip_prefix(p))?
        }
        None => segment
            .strip_prefix("crio-")
            .or_else(|| segment.strip_prefix("docker-"))
            .unwrap_or(segment),
    };
    (id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| id.to_owned())
}

/// Reads the pod and container of a process from its cgroup file.
pub fn parse(cgroup_file: &str) -> CgroupMatch {
    let mut pod: Option<String> = None;
    let mut container: Option<String> = None;
    // Whether some line names the pod but no container under it.
    let mut pod_level_line = false;
    for line in cgroup_file.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let segments: Vec<&str> = path.split('/').collect();
        let Some((i, uid)) = segments
            .iter()
            .enumerate()
            .find_map(|(i, s)| pod_uid(s).map(|u| (i, u)))
        else {
            continue;
        };
        if !segments[..i]
            .iter()
            .all(|s| kubelet_ancestor(s, segments[i]))
        {
            continue; // pod-shaped, but not where the kubelet puts pods
        }
        if pod.as_ref().is_some_and(|p| *p != uid) {
            return CgroupMatch::Ambiguous("the process is in the cgroups of two pods");
        }
        pod = Some(uid);
        // The container's cgroup is the one right under the pod's.
        match segments.get(i + 1).and_then(|s| container_id(s)) {
            Some(id) => {
                if container.as_ref().is_some_and(|c| *c != id) {
                    return CgroupMatch::Ambiguous(
                        "the process is in the cgroups of two containers",
                    );
                }
                container = Some(id);
            }
            None => pod_level_line = true,
        }
        if pod_level_line && container.is_some() {
            return CgroupMatch::Ambiguous(
                "the process is in a container's cgroup in some hierarchies and only in its pod's in others",
            );
        }
    }
    match (pod, container) {
        (None, _) => CgroupMatch::NotInPod,
        (Some(pod_uid), None) => CgroupMatch::PodOnly { pod_uid },
        (Some(pod_uid), Some(container_id)) => CgroupMatch::Container {
            pod_uid,
            container_id,
        },
    }
}
