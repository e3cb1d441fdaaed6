#!/usr/bin/env bash
# Checks every deployment file: each Kubernetes manifest against the
# Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail),
# that the kustomizations list exactly the manifest files there are (kustomize
# itself is not installed), and a checkov scan of the manifests and the
# Dockerfiles with zero failed checks. A check skipped on purpose carries its
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
    for r in k.get("resources", []):
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
