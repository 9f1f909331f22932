#!/usr/bin/env bash
# System packages the tests use: redis-server, PostgreSQL 15 server, Chromium (browser tests), and a C
# compiler for the Q4 CPU kernel (engine/int4_kernel.py builds it on first use; without one Q4 uses torch's).
# Installs what is missing when run as root; otherwise says what to install.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
{ command -v cc >/dev/null && [ -f /usr/include/stdlib.h ]; } || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system packages: ${missing[*]} (apt-get install ${missing[*]}); the tests needing them will be skipped." >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
