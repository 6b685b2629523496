#!/usr/bin/env bash
# Boot a real Apache + mod_wsgi on 127.0.0.1:PORT with this folder's snippets, in the
# foreground; Ctrl-C or SIGTERM stops it (and its daemon processes) cleanly.
#
#   apache/serve-local.sh 8080                      # mod_wsgi daemon mode
#   apache/serve-local.sh 8080 --proxy http://127.0.0.1:8000   # reverse proxy to gunicorn
#
# The caller's provider keys, base URLs and relay settings (LLM_*, OPENAI_*, SSE_*, …)
# are written to an env file that the app reads, as a production vhost would.
# Sizing and timeouts: RELAY_SSE_PROCESSES, RELAY_SSE_THREADS, RELAY_APP_PROCESSES,
# RELAY_APP_THREADS, RELAY_IO_TIMEOUT, RELAY_ANSWER_TIMEOUT, RELAY_APP_REQUEST_TIMEOUT,
# RELAY_MAX_WORKERS, RELAY_THREADS_PER_CHILD (environment).
# Memory against CPU (apache/README.md, step 5; both unset by default): RELAY_MAX_MEM_FREE
# (Apache's MaxMemFree, kB) and RELAY_MALLOC_ARENA_MAX (glibc's, for Apache and its daemons).
# Which mod_wsgi: RELAY_MOD_WSGI=pypi (the default: PyPI's mod-wsgi, pinned in pyproject.toml's
# `apache` group, built into the venv below; needs apache2-dev and python3-dev) or
# RELAY_MOD_WSGI=debian (libapache2-mod-wsgi-py3).
# A global "AddOutputFilterByType DEFLATE … text/event-stream" is in force, as a
# distribution's default config might have it: the snippets must switch it off for SSE.
set -euo pipefail

PORT=${1:?usage: apache/serve-local.sh PORT [--proxy BACKEND_URL]}
MODE=wsgi
BACKEND=""
if [ "${2:-}" = "--proxy" ]; then
    MODE=proxy
    BACKEND=${3:?--proxy needs the backend URL, e.g. http://127.0.0.1:8000}
fi

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
APACHE=$(command -v apache2 || command -v httpd || echo /usr/sbin/apache2)
MODULES=${APACHE_MODULES:-/usr/lib/apache2/modules}
[ -x "$APACHE" ] || { echo "serve-local: apache2 is not installed (apt-get install apache2 apache2-dev python3-dev)" >&2; exit 1; }
MOD_WSGI=${RELAY_MOD_WSGI:-pypi}
case "$MOD_WSGI" in
    pypi|debian) ;;
    *) echo "serve-local: RELAY_MOD_WSGI is pypi or debian, not '$MOD_WSGI'" >&2; exit 1 ;;
esac

# Apache refuses to run workers as root; www-data must be able to read everything it serves.
RUN_USER=$(id -un)
if [ "$(id -u)" = 0 ]; then RUN_USER=www-data; fi
RUN_GROUP=$(id -gn "$RUN_USER")

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/llm-sse-relay-apache.XXXXXX")
chmod 755 "$ROOT"
mkdir -p "$ROOT/run" "$ROOT/logs" "$ROOT/site"

if [ "$MODE" = wsgi ]; then
    # The app runs from a copy, so a checkout under /root (unreadable to www-data) works.
    cp -r "$REPO/app" "$REPO/wsgi.py" "$ROOT/site/"
    find "$ROOT/site" -name __pycache__ -prune -exec rm -rf {} +
    chmod -R a+rX "$ROOT/site"

    # A venv from the Python that mod_wsgi was built for (Debian's /usr/bin/python3),
    # outside /root, with the app's dependencies only (the code comes from the copy).
    VENV=${RELAY_VENV:-/var/tmp/llm-sse-relay/venv}
    STAMP="$VENV/.deps-$(sha1sum "$REPO/pyproject.toml" | cut -c1-12)"
    if [ ! -f "$STAMP" ]; then
        echo "serve-local: preparing $VENV" >&2
        mkdir -p "$(dirname "$VENV")"
        /usr/bin/python3 -m venv --clear "$VENV"
        "$VENV/bin/python" - "$REPO/pyproject.toml" > "$ROOT/requirements.txt" <<'EOF'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
EOF
        "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements.txt" \
            > "$ROOT/pip.log" 2>&1 || { cat "$ROOT/pip.log" >&2; exit 1; }
        touch "$STAMP"
        chmod -R a+rX "$(dirname "$VENV")"
    fi
    if [ "$MOD_WSGI" = pypi ]; then
        # Built against this Apache and this Python, so it lives in the venv (the `apache` group).
        MOD_STAMP="$VENV/.mod-wsgi-$(sha1sum "$REPO/pyproject.toml" | cut -c1-12)"
        if [ ! -f "$MOD_STAMP" ]; then
            command -v apxs >/dev/null || {
                echo "serve-local: building mod-wsgi needs apache2-dev and python3-dev (or RELAY_MOD_WSGI=debian)" >&2; exit 1; }
            echo "serve-local: building mod-wsgi into $VENV" >&2
            "$VENV/bin/python" - "$REPO/pyproject.toml" > "$ROOT/requirements-apache.txt" <<'EOF'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["apache"]))
EOF
            "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements-apache.txt" \
                > "$ROOT/pip.log" 2>&1 || { cat "$ROOT/pip.log" >&2; exit 1; }
            touch "$MOD_STAMP"
            chmod -R a+rX "$VENV"
        fi
        # Its LoadModule line (and WSGIPythonHome: the venv the daemons use as well).
        LOAD_WSGI=$("$VENV/bin/mod_wsgi-express" module-config)
    else
        [ -f "$MODULES/mod_wsgi.so" ] || {
            echo "serve-local: RELAY_MOD_WSGI=debian needs libapache2-mod-wsgi-py3" >&2; exit 1; }
        LOAD_WSGI="LoadModule wsgi_module $MODULES/mod_wsgi.so"
    fi

    # The caller's environment, for the app (daemon processes do not inherit a shell's).
    env | grep -E '^(LLM_|OPENAI_|ANTHROPIC_|GROQ_|MISTRAL_|GEMINI_|OLLAMA_|SSE_|UPSTREAM_|MAX_|DEMO_|STORE_URL|API_TOKENS|CORS_ORIGINS|RATE_LIMIT|STREAM_|LOG_LEVEL|JWT_|TRUSTED_PROXIES|HISTORY_|CONVERSATION_|TOOL_)' > "$ROOT/relay.env" || true
    chmod 644 "$ROOT/relay.env"
    SITE_DEFINES="Define RELAY_HOME $ROOT/site
Define RELAY_VENV $VENV
Define RELAY_ENV_FILE $ROOT/relay.env
Define RELAY_USER $RUN_USER
Define RELAY_GROUP $RUN_GROUP"
    SITE_INCLUDE="Include $HERE/llm-sse-relay.conf"
    # The store (SQLite by default) must be shared by every daemon process.
    if ! grep -q '^STORE_URL=' "$ROOT/relay.env"; then
        mkdir -p "$ROOT/data" && chown "$RUN_USER:$RUN_GROUP" "$ROOT/data" 2>/dev/null || true
        echo "STORE_URL=sqlite:///$ROOT/data/relay.sqlite3" >> "$ROOT/relay.env"
    fi
else
    SITE_DEFINES="Define RELAY_BACKEND $BACKEND"
    SITE_INCLUDE="Include $HERE/proxy-gunicorn.conf"
fi

define_opt() { [ -n "${!1:-}" ] && echo "Define $1 ${!1}" || true; }
MAX_WORKERS=${RELAY_MAX_WORKERS:-1000}
PER_CHILD=${RELAY_THREADS_PER_CHILD:-250}  # as apache/README.md recommends
MAX_MEM_FREE=${RELAY_MAX_MEM_FREE:-}  # Apache's default (2048 kB) unless set: step 5

cat > "$ROOT/httpd.conf" <<EOF
ServerRoot $ROOT
ServerName 127.0.0.1
Listen 127.0.0.1:$PORT
PidFile $ROOT/run/httpd.pid
DefaultRuntimeDir $ROOT/run
Mutex file:$ROOT/run default
ErrorLog $ROOT/logs/error.log
LogLevel ${RELAY_APACHE_LOG_LEVEL:-warn}
User $RUN_USER
Group $RUN_GROUP

<IfModule !mpm_event_module>
    LoadModule mpm_event_module $MODULES/mod_mpm_event.so
</IfModule>
<IfModule !authz_core_module>
    LoadModule authz_core_module $MODULES/mod_authz_core.so
</IfModule>
<IfModule !mime_module>
    LoadModule mime_module $MODULES/mod_mime.so
</IfModule>
<IfModule !log_config_module>
    LoadModule log_config_module $MODULES/mod_log_config.so
</IfModule>
<IfModule !headers_module>
    LoadModule headers_module $MODULES/mod_headers.so
</IfModule>
<IfModule !setenvif_module>
    LoadModule setenvif_module $MODULES/mod_setenvif.so
</IfModule>
<IfModule !env_module>
    LoadModule env_module $MODULES/mod_env.so
</IfModule>
<IfModule !filter_module>
    LoadModule filter_module $MODULES/mod_filter.so
</IfModule>
<IfModule !deflate_module>
    LoadModule deflate_module $MODULES/mod_deflate.so
</IfModule>
<IfModule !brotli_module>
    LoadModule brotli_module $MODULES/mod_brotli.so
</IfModule>
<IfModule !reqtimeout_module>
    LoadModule reqtimeout_module $MODULES/mod_reqtimeout.so
</IfModule>
${LOAD_WSGI:-}
<IfModule !unique_id_module>
    LoadModule unique_id_module $MODULES/mod_unique_id.so
</IfModule>
<IfModule !proxy_module>
    LoadModule proxy_module $MODULES/mod_proxy.so
</IfModule>
<IfModule !proxy_http_module>
    LoadModule proxy_http_module $MODULES/mod_proxy_http.so
</IfModule>

# Each open stream holds one Apache worker thread: size above the stream capacity.
<IfModule mpm_event_module>
    ThreadLimit $PER_CHILD
    ServerLimit $(( (MAX_WORKERS + PER_CHILD - 1) / PER_CHILD ))
    ThreadsPerChild $PER_CHILD
    MaxRequestWorkers $MAX_WORKERS
    # Every child from the start, and none reaped when idle (apache/README.md, step 5).
    StartServers $(( (MAX_WORKERS + PER_CHILD - 1) / PER_CHILD ))
    MinSpareThreads $PER_CHILD
    MaxSpareThreads $MAX_WORKERS
</IfModule>
$([ -n "$MAX_MEM_FREE" ] && echo "MaxMemFree $MAX_MEM_FREE")

<IfModule wsgi_module>
    WSGISocketPrefix $ROOT/run/wsgi
</IfModule>
LogFormat "%h %l %u %t \"%r\" %>s %b %D" timed
CustomLog $ROOT/logs/access.log timed
TypesConfig /etc/mime.types

# As a distribution's default config might have it: compress everything, SSE included.
AddOutputFilterByType DEFLATE text/html text/plain text/css application/javascript application/json text/event-stream

$(define_opt RELAY_SSE_PROCESSES)
$(define_opt RELAY_SSE_THREADS)
$(define_opt RELAY_APP_PROCESSES)
$(define_opt RELAY_APP_THREADS)
$(define_opt RELAY_IO_TIMEOUT)
$(define_opt RELAY_ANSWER_TIMEOUT)
$(define_opt RELAY_APP_REQUEST_TIMEOUT)
$SITE_DEFINES

<VirtualHost 127.0.0.1:$PORT>
    $SITE_INCLUDE
</VirtualHost>
EOF

"$APACHE" -t -f "$ROOT/httpd.conf" >/dev/null 2>"$ROOT/configtest.log" || { cat "$ROOT/configtest.log" >&2; rm -rf "$ROOT"; exit 1; }

APACHE_PID=""
stop() {
    trap - INT TERM EXIT
    if [ -n "$APACHE_PID" ] && kill -0 "$APACHE_PID" 2>/dev/null; then
        kill -TERM "$APACHE_PID" 2>/dev/null || true   # Apache stops its children and daemons
        for _ in $(seq 50); do kill -0 "$APACHE_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$APACHE_PID" 2>/dev/null || true
    fi
    # No daemon left behind, whatever happened to the parent.
    pkill -KILL -f "$ROOT/httpd.conf" 2>/dev/null || true
    if [ -n "${RELAY_KEEP_LOGS:-}" ]; then cp -r "$ROOT/logs" "$RELAY_KEEP_LOGS" 2>/dev/null || true; fi
    rm -rf "$ROOT"
}
trap stop INT TERM EXIT

# As /etc/apache2/envvars would: the daemons see the env file at start and build the app then.
START_ENV=()
[ "$MODE" = wsgi ] && START_ENV=("LLM_RELAY_ENV_FILE=$ROOT/relay.env")
# As envvars or the systemd unit would set it (apache/README.md, step 5).
[ -n "${RELAY_MALLOC_ARENA_MAX:-}" ] && START_ENV+=("MALLOC_ARENA_MAX=$RELAY_MALLOC_ARENA_MAX")
env "${START_ENV[@]}" "$APACHE" -f "$ROOT/httpd.conf" -DFOREGROUND &
APACHE_PID=$!
for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    kill -0 "$APACHE_PID" 2>/dev/null || { cat "$ROOT/logs/error.log" >&2; exit 1; }
    sleep 0.1
done
echo "llm-sse-relay under Apache ($MODE): http://127.0.0.1:$PORT/  (logs: $ROOT/logs)"
wait "$APACHE_PID" || true
