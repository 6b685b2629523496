"""Real servers as subprocesses: Apache via apache/serve-local.sh, and gunicorn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
RELAY_PREFIXES = ("LLM_", "OPENAI_", "ANTHROPIC_", "GROQ_", "MISTRAL_", "GEMINI_", "OLLAMA_", "SSE_",
                  "UPSTREAM_", "MAX_", "DEMO_", "STORE_URL", "API_TOKENS", "CORS_ORIGINS", "RATE_LIMIT", "STREAM_",
                  "JWT_", "TRUSTED_PROXIES", "HISTORY_", "CONVERSATION_", "TOOL_", "METRICS_", "PROMETHEUS_")


class ServerProcess:
    """Starts a server command, waits for /healthz, stops it with SIGTERM."""

    health_path = "/healthz"

    def __init__(self, args: list[str], port: int, env: dict[str, str], startup: float = 180) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(RELAY_PREFIXES)}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="relay-server-", suffix=".log", delete=False)
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(args, cwd=REPO, env={**clean, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + startup
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(f"{self.url}{self.health_path}", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{args[0]} did not start:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


def apache(port: int, env: dict[str, str], proxy_to: str | None = None) -> ServerProcess:
    args = ["bash", str(REPO / "apache" / "serve-local.sh"), str(port)]
    if proxy_to:
        args += ["--proxy", proxy_to]
    return ServerProcess(args, port, env)


def gunicorn(port: int, env: dict[str, str]) -> ServerProcess:
    """gunicorn with gunicorn.conf.py; a store of its own unless `env` names one (the default,
    a SQLite file in the checkout's instance/, would carry every run's conversations, and the
    storage quota of 127.0.0.1, into the next)."""
    args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    store = f"sqlite:///{tempfile.mkdtemp(prefix='relay-store-')}/relay.sqlite3"
    return ServerProcess(args, port, {"WEB_CONCURRENCY": "1", "ACCESS_LOG": "", "STORE_URL": store, **env,
                                      "BIND": f"127.0.0.1:{port}"}, startup=30)


def nginx(port: int, backend: str, edits: dict[str, str] | None = None) -> ServerProcess:
    """Debian's nginx with apache/nginx.conf as shipped, only its two addresses changed (and
    `edits`, text replaced, e.g. shorter timeouts)."""
    import shutil

    prefix = Path(tempfile.mkdtemp(prefix="relay-nginx-"))
    prefix.chmod(0o755)  # nginx's workers run as nobody and keep temp files here
    (prefix / "logs").mkdir()
    site = (REPO / "apache" / "nginx.conf").read_text()
    site = site.replace("server 127.0.0.1:8000;", f"server {backend.removeprefix('http://')};")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    for old, new in (edits or {}).items():
        assert old in site, old
        site = site.replace(old, new)
    (prefix / "nginx.conf").write_text(f"""
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{site}
}}
""")
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    server = ServerProcess([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr",
                            "-g", "daemon off;"], port, {})
    server.prefix = prefix
    return server
