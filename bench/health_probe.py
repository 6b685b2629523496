"""Probes `<url>/healthz` every 0.5 s and prints each answer's time in ms, one per line,
until stdin closes. A process of its own, as a load balancer is: a thread of the load
generator would wait for that busy process's GIL and add its wait to every probe.

    python -m bench.health_probe http://127.0.0.1:8000
"""

from __future__ import annotations

import sys
import threading
import time

import requests

TIMEOUT_MS = 10_000.0


def main() -> None:
    url = sys.argv[1].rstrip("/") + "/healthz"
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    session = requests.Session()
    session.trust_env = False
    while not done.wait(0.5):
        started = time.monotonic()
        try:
            # A new connection each time, as most load balancers' checks make.
            session.get(url, timeout=TIMEOUT_MS / 1000, headers={"Connection": "close"}).raise_for_status()
            print(f"{(time.monotonic() - started) * 1000:.2f}", flush=True)
        except requests.RequestException:
            print(f"{TIMEOUT_MS:.2f}", flush=True)


if __name__ == "__main__":
    main()
