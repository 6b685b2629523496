"""The benchmark: added latency, CPU per token, memory and open streams, side by side.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/run.py            # full run (~15 min on 2 cores)
    .venv/bin/python bench/run.py --quick    # about a minute: a smoke test

Targets, all against the same fake upstream (bench/upstream.py), interleaved per
repeat so machine noise hits each alike, medians over repeats:
  upstream  the fake upstream read directly: the floor
  relay     this project under gunicorn.conf.py (gevent), POST-SSE (stream log on, SQLite)
  relay-direct  the same, GET /api/chat/stream (no stream log: what EventSource users run)
  apache    this project under Apache via apache/serve-local.sh with its default mod_wsgi
            (PyPI's mod-wsgi, built into the venv), POST-SSE
  apache-direct  the same Apache, GET /api/chat/stream
  apache-debian, apache-debian-direct  the same with Debian's libapache2-mod-wsgi-py3
  peer      FastAPI + sse-starlette + httpx (bench/peers/fastapi_peer.py) under uvicorn
Two kinds of load, in one table: a burst (N streams opened within min(2 s, N/500 s): the
cost of setting streams up) and an open loop (--open-loop RATExSECONDS: new streams arriving
at RATE per second for SECONDS, whatever the server does meanwhile, as users arrive: TTFT
under steady arrival, apart from the cost of a burst).
Heartbeats stay on everywhere (15 s). Results: printed, and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import Result, run_load  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ /proc


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            pass
    return total / TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
    return total


class RssPeak:
    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids = process_tree(self.root)
        n = 0
        while not self._stop.wait(0.25):
            n += 1
            if n % 8 == 0:
                pids = process_tree(self.root)
            self.peak = max(self.peak, rss_bytes(pids))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ targets


class Target:
    def __init__(self, name: str, args: list[str], env: dict[str, str], url: str, mode: str,
                 health: str | None = None) -> None:
        self.name, self.url, self.mode = name, url, mode
        self.health = health or url  # where load balancers' checks go: <health>/healthz
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        # Ready means every process group answers: under Apache /healthz, the page and streams
        # each have their own, and one may still be loading Python (an unknown stream is a 404).
        probes = [url + "/stats"] if mode == "openai" else [
            self.health + "/healthz", url + "/", url + "/api/chat/streams/ready-probe"]
        for _ in range(900):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if all(requests.get(probe, timeout=2).status_code in (200, 404) for probe in probes):
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{name} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


# name: (serve-local.sh's settings beyond the bench's own, load mode)
APACHE_TARGETS = {
    "apache": ({}, "postsse"), "apache-direct": ({}, "get"),
    "apache-debian": ({"RELAY_MOD_WSGI": "debian"}, "postsse"),
    "apache-debian-direct": ({"RELAY_MOD_WSGI": "debian"}, "get"),
}


def start_targets(names: list[str], upstream_url: str, workdir: str) -> dict[str, Target]:
    relay_env = {"OPENAI_API_KEY": "bench", "OPENAI_BASE_URL": upstream_url, "LOG_LEVEL": "WARNING",
                 "UPSTREAM_POOL_SIZE": "4096", "MAX_STREAMS_PER_CLIENT": "0", "MAX_TICKETS_PER_CLIENT": "0",
                 "MAX_READERS_PER_CLIENT": "0",
                 # One client address opens every stream: its 64 MiB storage quota (4096
                 # conversations) ran out mid-run (413). The peer keeps no conversations.
                 "STORAGE_QUOTA_BYTES": "0",
                 "STREAM_GRACE_SECONDS": "0"}
    targets: dict[str, Target | None] = {}
    try:
        start_each(names, targets, relay_env, upstream_url, workdir)
    except BaseException:
        for target in targets.values():  # none left running when one fails to start
            if target is not None:
                target.stop()
        raise
    return targets


def start_each(names: list[str], targets: dict, relay_env: dict, upstream_url: str, workdir: str) -> None:
    for name in names:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name == "upstream":
            targets[name] = None  # filled by main: the upstream itself
        elif name in ("relay", "relay-direct"):  # relay-direct: GET /api/chat/stream, no stream log
            # Health checks on the health port (gunicorn.conf.py), as a load balancer would make them.
            health_port = free_port()
            env = {**relay_env, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2", "ACCESS_LOG": "",
                   "WORKER_CONNECTIONS": "4000", "STORE_URL": f"sqlite:///{workdir}/{name}.sqlite3",
                   "HEALTH_BIND": f"127.0.0.1:{health_port}"}
            targets[name] = Target(name, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                   env, url, "postsse" if name == "relay" else "get",
                                   health=f"http://127.0.0.1:{health_port}")
        elif name in APACHE_TARGETS:
            settings, mode = APACHE_TARGETS[name]
            env = {**relay_env, "RELAY_SSE_PROCESSES": "2", "RELAY_SSE_THREADS": "300", "RELAY_MAX_WORKERS": "1500",
                   **settings}
            targets[name] = Target(name, ["bash", "apache/serve-local.sh", str(port)], env, url, mode)
        elif name == "peer":
            env = {"OPENAI_BASE_URL": upstream_url}
            targets[name] = Target(name, [sys.executable, "-m", "uvicorn", "bench.peers.fastapi_peer:app",
                                          "--port", str(port), "--workers", "2", "--log-level", "warning",
                                          "--no-access-log", "--backlog", "4096"], env, url, "get")


# ------------------------------------------------------------------ measuring


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(target: Target, streams: int, tokens: int, ramp: float, probe_health: bool) -> dict:
    tree = process_tree(target.proc.pid)
    cpu0 = cpu_seconds(tree)
    prober = None
    if probe_health:
        prober = subprocess.Popen([sys.executable, "-m", "bench.health_probe", target.health], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with RssPeak(target.proc.pid) as rss:
        result: Result = asyncio.run(run_load(target.url, target.mode, streams, tokens, ramp=ramp,
                                              timeout=max(60, tokens / 5)))
    health: list[float] = []
    if prober is not None:
        out, _ = prober.communicate("", timeout=30)  # stdin closed: it stops after its current probe
        health = [float(line) for line in out.split()]
    cpu = cpu_seconds(process_tree(target.proc.pid)) - cpu0
    return {
        "completed": result.completed, "failed": streams - result.completed, "failures": result.failures,
        "latency_p50_ms": pct(result.latencies_ms, 0.5), "latency_p99_ms": pct(result.latencies_ms, 0.99),
        "ttft_p50_ms": pct(result.ttft_ms, 0.5), "ticket_p50_ms": pct(result.ticket_ms, 0.5),
        "tokens": result.tokens,
        "cpu_us_per_token": cpu / result.tokens * 1e6 if result.tokens else None,
        "tokens_per_s": result.tokens / result.seconds if result.seconds else None,
        "peak_rss_mb": rss.peak / 2**20,
        "health_p50_ms": pct(health, 0.5), "health_max_ms": max(health) if health else None,
    }


def median_of(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        out[key] = statistics.median(values) if values else runs[-1][key]
    out["failures"] = runs[-1]["failures"]
    return out


def idle_rss(target: Target) -> int:
    return rss_bytes(process_tree(target.proc.pid))


def start_upstream(rate: float, tokens: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"), "--port", str(port),
                             "--rate", str(rate), "--tokens", str(tokens)], start_new_session=True,
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(url + "/stats", timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("upstream did not start")


def fmt(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small N, one repeat: about a minute")
    parser.add_argument("--targets", default="upstream,relay,relay-direct,peer,apache,apache-direct")
    parser.add_argument("--n", default="200,1000,2000", help="burst sizes (empty: none)")
    parser.add_argument("--open-loop", default="50x10",
                        help="open-loop loads, RATExSECONDS[,…]: RATE new streams a second for SECONDS "
                             "(empty: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--apache-max", type=int, default=500,
                        help="most streams open at once sent to Apache (its SSE capacity)")
    parser.add_argument("--fast-tokens", type=int, default=20000, help="tokens of the one-stream speed run")
    args = parser.parse_args()
    if args.quick:
        args.n, args.open_loop, args.repeats, args.fast_tokens = "50,200", "20x5", 1, 5000
    names = args.targets.split(",")
    # (label, streams, seconds over which they start, is a burst)
    loads = [(str(n), n, min(2.0, n / 500), True) for n in map(int, filter(None, args.n.split(",")))]
    for spec in filter(None, args.open_loop.split(",")):
        rate, seconds = (float(x) for x in spec.split("x"))
        loads.append((f"{rate:g}/s×{seconds:g}s", round(rate * seconds), seconds, False))
    workdir = tempfile.mkdtemp(prefix="relay-bench-")
    upstream, upstream_url = start_upstream(args.rate, args.tokens)
    try:
        targets = start_targets(names, upstream_url, workdir)
    except BaseException:
        upstream.terminate()  # nor the upstream, when a target fails to start
        raise
    if "upstream" in names:
        targets["upstream"] = Target.__new__(Target)
        targets["upstream"].name, targets["upstream"].url, targets["upstream"].mode = "upstream", upstream_url, "openai"
        targets["upstream"].proc = upstream
    idle = {name: idle_rss(t) for name, t in targets.items()}
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                     "rate": args.rate, "tokens": args.tokens, "runs": []}
    try:
        for label, n, ramp, burst in loads:
            # Streams open at once: all of a burst; in an open loop, those started during one
            # stream's life (K/R seconds, plus a second for setup).
            concurrent = n if burst else min(n, round(n / ramp * (args.tokens / args.rate + 1)))
            runs: dict[str, list[dict]] = {name: [] for name in names}
            for repeat in range(args.repeats):
                order = names[repeat % len(names):] + names[:repeat % len(names)]  # rotate: noise hits all alike
                for name in order:
                    if name.startswith("apache") and concurrent > args.apache_max:
                        continue
                    print(f"N={label} repeat {repeat + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
                    runs[name].append(measure(targets[name], n, args.tokens, ramp=ramp,
                                              probe_health=name != "upstream"))
                    time.sleep(1)
            for name, measured in runs.items():
                if measured:
                    row = {"target": name, "n": label, "streams": n, **median_of(measured)}
                    row["rss_kb_per_stream"] = max(0.0, (row["peak_rss_mb"] * 2**20 - idle[name]) / 1024 / concurrent)
                    results["runs"].append(row)
        upstream.terminate()
        upstream, upstream_url = start_upstream(0, args.fast_tokens)
        fast_targets = start_targets([t for t in names if t in ("relay", "peer")], upstream_url, workdir)
        for name, target in fast_targets.items():
            print(f"one stream, {args.fast_tokens} tokens as fast as possible: {name}", file=sys.stderr, flush=True)
            row = measure(target, 1, args.fast_tokens, ramp=0, probe_health=False)
            results["runs"].append({"target": f"{name} (1 stream, R=max)", "n": 1, **row})
            target.stop()
    finally:
        for target in targets.values():
            if target is not None and target.name != "upstream":
                target.stop()
        upstream.terminate()

    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['date']} · {results['machine']} · K={args.tokens} tokens at R={args.rate:g}/s\n")
    print("| target | N | completed/failed | added p50 ms | added p99 ms | TTFT p50 ms | CPU µs/token | "
          "peak RSS MB | kB/stream | /healthz max ms | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['target']} | {r['n']} | {r['completed']:.0f}/{r['failed']:.0f} | {fmt(r['latency_p50_ms'], 2)} | "
              f"{fmt(r['latency_p99_ms'], 2)} | {fmt(r['ttft_p50_ms'])} | {fmt(r['cpu_us_per_token'])} | "
              f"{fmt(r['peak_rss_mb'])} | {fmt(r.get('rss_kb_per_stream'))} | {fmt(r.get('health_max_ms'))} | "
              f"{fmt(r['tokens_per_s'], 0)} |")
        if r["failures"]:
            print(f"|   failures: {r['failures']} |")


if __name__ == "__main__":
    main()
