#!/usr/bin/env bash
# Make a fresh Debian 12 machine (root) ready to build, run and test pg_quota.
# Idempotent: every step checks before it acts, so a second run takes seconds.
set -euo pipefail

PGRX_VERSION=0.18.0
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
# The official OpenAI Python SDK, for tests/sdk/ (same venv path as in lib.sh).
SDK_VENV=${PGQ_SDK_VENV:-/var/tmp/pg_quota-sdk-venv}
OPENAI_SDK='openai>=3,<4'
APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config sudo
              libssl-dev python3-venv)

say()  { printf '[bootstrap] %s\n' "$*"; }
fail() { printf '[bootstrap] FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (apt-get and cargo pgrx init need it)"
command -v cargo >/dev/null || fail "cargo not found on PATH (the Rust toolchain must be installed)"

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || fail "apt-get update"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]}"
else
  say "apt packages present"
fi
[ -x "$PG_CONFIG" ] || fail "$PG_CONFIG missing after install (postgresql-server-dev-15)"

if cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  say "cargo-pgrx $PGRX_VERSION present"
else
  say "installing cargo-pgrx $PGRX_VERSION (about 6 minutes on 2 cores)"
  cargo install --locked cargo-pgrx --version "$PGRX_VERSION" >/dev/null 2>&1 \
    || fail "cargo install cargo-pgrx $PGRX_VERSION"
fi

PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if grep -qs "pg15 *= *\"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
  say "cargo pgrx already initialised for pg15"
else
  say "cargo pgrx init --pg15 $PG_CONFIG"
  cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null || fail "cargo pgrx init"
fi

if "$SDK_VENV/bin/python" -c 'import openai, sys; sys.exit(openai.__version__.split(".")[0] != "3")' 2>/dev/null; then
  say "openai SDK present in $SDK_VENV"
else
  say "installing the openai SDK ($OPENAI_SDK) into $SDK_VENV"
  rm -rf "$SDK_VENV"
  /usr/bin/python3 -m venv "$SDK_VENV" || fail "python3 -m venv $SDK_VENV"
  "$SDK_VENV/bin/pip" install -q "$OPENAI_SDK" >/dev/null || fail "pip install $OPENAI_SDK"
fi

say "ready"
