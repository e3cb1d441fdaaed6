#!/usr/bin/env bash
# Checks every deployment file: each Kubernetes manifest against the
# Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail),
# that the kustomizations list exactly the manifest files there are (kustomize
# itself is not installed), that workloads (pods outside the sigil namespace)
# run in namespaces enforcing the restricted Pod Security Standard with no
# hostPath, and a checkov scan of the manifests and the Dockerfiles with zero
# failed checks. A check skipped on purpose carries its
# reason next to it: `checkov.io/skipN: <ID>=<reason>` annotations in the
# manifests, `# checkov:skip=<ID>:<reason>` comments in Dockerfiles.
#
# Usage: deploy/k8s/check.sh   (installs the pinned tools into .venv-deploy)
set -euo pipefail
cd "$(dirname "$0")/../.."

req=deploy/k8s/requirements.txt
venv=.venv-deploy
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/requirements.txt"; then
  echo "==> installing the manifest validators into $venv ($req)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.txt"
fi

mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
if [ ${#manifests[@]} -eq 0 ]; then
  echo "no manifests found under deploy/k8s" >&2
  exit 1
fi

echo "==> kubernetes-validate (${#manifests[@]} files)"
"$venv/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"

echo "==> kustomizations list every manifest, and only existing files"
"$venv/bin/python" - "${manifests[@]}" <<'PY'
import os, sys, yaml
manifests = set(os.path.normpath(p) for p in sys.argv[1:])
listed, errors = set(), []
for root, _, files in os.walk("deploy/k8s"):
    if "kustomization.yaml" not in files:
        continue
    k = yaml.safe_load(open(os.path.join(root, "kustomization.yaml")))
    for r in k.get("resources", []) + k.get("components", []):
        path = os.path.normpath(os.path.join(root, r))
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "kustomization.yaml")):
                errors.append(f"{root}/kustomization.yaml: {r} has no kustomization.yaml")
        elif os.path.isfile(path):
            listed.add(path)
        else:
            errors.append(f"{root}/kustomization.yaml: {r} does not exist")
for m in sorted(manifests - listed):
    errors.append(f"{m} is in no kustomization.yaml")
for e in errors:
    print(e, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(listed)} resources listed, all present")
PY

echo "==> workloads: restricted namespaces, no hostPath"
"$venv/bin/python" - "${manifests[@]}" <<'PY'
import sys, yaml
# Namespaces of Sigil itself (the agent and the CSI driver are node
# infrastructure and need host access); every other pod is a workload.
SIGIL = {"sigil"}
POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
docs = [(p, d) for p in sys.argv[1:] for d in yaml.safe_load_all(open(p)) if d]
enforced = {d["metadata"]["name"]: (d["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce")
            for _, d in docs if d["kind"] == "Namespace"}
def has_key(node, key):
    if isinstance(node, dict):
        return key in node or any(has_key(v, key) for v in node.values())
    if isinstance(node, list):
        return any(has_key(v, key) for v in node)
    return False
errors, workloads = [], 0
for path, d in docs:
    ns = d["metadata"].get("namespace", "default")
    if d["kind"] not in POD_KINDS or ns in SIGIL:
        continue
    workloads += 1
    name = f'{path}: {d["kind"]} {ns}/{d["metadata"]["name"]}'
    if has_key(d, "hostPath"):
        errors.append(f"{name} has a hostPath volume (mount the agent socket with a csi.spiffe.io volume)")
    if enforced.get(ns) != "restricted":
        errors.append(f"{name}: namespace {ns} does not enforce Pod Security restricted (enforce={enforced.get(ns)})")
for e in errors:
    print(e, file=sys.stderr)
if errors:
    sys.exit(1)
if workloads == 0:
    sys.exit("no workload manifests found: the check would pass vacuously")
print(f"{workloads} workloads: restricted, no hostPath")
PY

echo "==> checkov (manifests and Dockerfiles under deploy/)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
"$venv/bin/checkov" --quiet --compact --skip-download \
  --framework kubernetes dockerfile -d deploy >"$log" 2>&1 || status=$?
# Without network checkov logs a stack trace for its guideline download;
# show only its results.
grep -v -e '^\s*File "' -e 'urllib3' -e 'prismacloud' -e '^Traceback' -e '^\s*raise ' "$log" || true
if [ "$status" -ne 0 ]; then
  echo "checkov found failed checks (exit $status)" >&2
  exit 1
fi
echo "deploy checks: ok"
