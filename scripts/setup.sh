#!/usr/bin/env bash
# Idempotent setup: a venv in .venv with tensorstream and every pinned dependency.
# Re-running reuses the venv and skips pip when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

py=""
for cand in "${PYTHON:-}" python3.11 python3; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 \
     && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    py=$cand; break
  fi
done
[ -n "$py" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $py"
  "$py" -m venv .venv
fi

stamp=.venv/.tensorstream-setup
digest=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$digest" ]; then
  echo "setup: installing pinned dependencies (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip==26.3" >/dev/null
  # requirements.lock pins every transitive package; pyproject.toml pins the direct ones.
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[all,dev]"
  echo "$digest" > "$stamp"
fi

if [ "$want_tests" = 1 ]; then
  # kcat (a Kafka client nobody here wrote) is used by the interop tests; headless Chromium
  # (Debian's, driven by Playwright or chromedriver) by the dashboard's browser test.
  missing=""
  command -v kcat >/dev/null 2>&1 || missing="$missing kcat"
  # stunnel4: the TLS endpoint in front of the embedded broker (tests/test_tls.py); openssl: its TLS library + CLI
  command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || missing="$missing stunnel4"
  command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
  [ -x /usr/bin/chromium ] || missing="$missing chromium"
  command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "setup: installing$missing (apt-get)"
      # shellcheck disable=SC2086  # word splitting of the package list is intended
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null
    else
      echo "setup: missing$missing and we are not root: run 'sudo apt-get install$missing'" >&2
      exit 1
    fi
  fi
fi
