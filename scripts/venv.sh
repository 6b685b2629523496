# Sourced by serve.sh and test.sh: make .venv from Debian's python3 (the one mod_wsgi
# is built for), installing python3-venv first on a bare Debian machine.
make_venv() {
    local python=/usr/bin/python3
    [ -x "$python" ] || python=$(command -v python3)
    if [ ! -x .venv/bin/python ]; then
        if ! "$python" -m venv .venv 2>/dev/null; then
            rm -rf .venv
            as_root apt-get update -q
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
            "$python" -m venv .venv
        fi
        .venv/bin/python -m pip install -q --upgrade pip
    fi
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root for: $*" >&2; return 1; fi
}
