#!/usr/bin/env bash
# Install everything the tests use (Debian packages for the real Apache, Chromium and
# redis-server; Python packages into .venv; the openai npm package into tests/node) and
# run the whole suite: lint, unit, live sockets, Apache, browser. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

as_root apt-get update -q
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    apache2 libapache2-mod-wsgi-py3 chromium fonts-noto-color-emoji redis-server python3-venv curl procps

make_venv
.venv/bin/pip install -q -e '.[test]'
# Real JavaScript clients (the openai npm package) for the OpenAI-compatible API tests.
command -v npm >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
.venv/bin/ruff check .

# Real parts are required: a missing Apache or Chromium fails the run instead of skipping.
export LLM_RELAY_REQUIRE_ALL=${LLM_RELAY_REQUIRE_ALL:-1}
exec .venv/bin/python -m pytest "$@"
