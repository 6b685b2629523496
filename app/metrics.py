"""Prometheus metrics, exact across processes (gunicorn workers, mod_wsgi daemon processes).

prometheus_client's multiprocess mode: every process writes its own files into one
directory (`METRICS_DIR`) and `/metrics` sums them. The directory belongs to the server
that started the processes, their parent (gunicorn's master, Apache's parent process):
the first process of a new parent empties it, so a restart starts from zero while a
graceful reload (new workers, same parent) keeps counting. `/metrics` is protected like
the API, or by its own `METRICS_TOKEN`.

Labels are bounded: every value is the server's own or "other". Providers are the
configured ones; models those listed, configured or allowed by name for their provider;
tools the registered ones (a model may ask for any name: the call fails, its label is
"other"); transports, outcomes and error types the relay's own words. No client, and no
model, can create series at will.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Collection, Mapping
from typing import Any

from app.config import ConfigError

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
OTHER = "other"
log = logging.getLogger("llm_sse_relay.metrics")
TRANSPORTS = frozenset({"sse", "fetch", "postsse", "ws", "rest", "openai", "responses", "anthropic", "ai-sdk",
                        "python"})
OUTCOMES = frozenset({"done", "error", "stopped", "abandoned", "closed"})
UPSTREAM_ERRORS = frozenset({"upstream_error", "upstream_auth", "upstream_rate_limited", "upstream_timeout",
                             "upstream_unreachable", "upstream_disconnected", "upstream_protocol_error",
                             "upstream_blocked"})
TOOL_STATUSES = frozenset({"done", "error"})


def bounded(value: str, known: Collection[str]) -> str:
    """`value` if it is one of `known`, else "other"."""
    return value if value in known else OTHER


def default_dir(instance_path: str) -> str:
    """A directory per deployment (its instance path) and user, outside any checkout."""
    tag = hashlib.sha256(os.path.abspath(instance_path).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"llm-sse-relay-metrics-{os.getuid()}-{tag}")


def prepare_dir(path: str) -> None:
    """Make the directory this server's: emptied once per parent process, under a lock."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_private(path)
    parent = str(os.getppid())
    with open(os.path.join(path, ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = os.path.join(path, ".parent")
        try:
            with open(marker) as handle:
                owner = handle.read().strip()
        except OSError:
            owner = ""
        if owner != parent:  # a new server: what the last one counted is not ours
            for name in os.listdir(path):
                if name.endswith(".db"):
                    os.remove(os.path.join(path, name))
            with open(marker, "w") as handle:
                handle.write(parent)
        # Live gauges (streams open) of processes that are gone stop counting; counters stay,
        # so totals never go down while the server runs.
        for name in os.listdir(path):
            if name.startswith("gauge_live") and name.endswith(".db") and not _alive(name):
                os.remove(os.path.join(path, name))


def check_private(path: str) -> None:
    """Refuse a directory (or a symlink to one) that is another user's or that others may write
    to. The default is a predictable name in the shared temp dir: whoever made it first would
    choose where this server's processes create files, and which `.db` files they delete."""
    uid = os.getuid()
    link, target = os.lstat(path), os.stat(path)
    owner = next((s.st_uid for s in (link, target) if s.st_uid != uid), None)
    if owner is not None:
        raise ConfigError(f"METRICS_DIR {path} belongs to another user (uid {owner}); "
                          "set METRICS_DIR to a directory of this server's user")
    if not stat.S_ISDIR(target.st_mode):
        raise ConfigError(f"METRICS_DIR {path} is not a directory")
    if target.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"METRICS_DIR {path} may be written by other users (mode {stat.S_IMODE(target.st_mode):o}); "
                          f"chmod 700 it or set METRICS_DIR to a private directory")


def _alive(filename: str) -> bool:
    try:
        os.kill(int(filename.rsplit("_", 1)[1].removesuffix(".db")), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def process_directory(directory: str) -> str:
    """The directory this process writes its metrics files into: the first one asked for.

    prometheus_client's multiprocess mode is the process's, not an app's: its values find their
    files through the `PROMETHEUS_MULTIPROC_DIR` environment variable, and its metric classes
    take their value class from a module global chosen at import. Both are set here, once; a
    second app of the process (tests make many) writes into the same directory, each with its
    own registry and labels."""
    chosen = os.environ.setdefault(METRICS_DIR_ENV, directory)
    if chosen != directory:
        log.info("metrics of this process already go to %s; not to %s", chosen, directory)
    import prometheus_client.values as values

    # Chosen from the environment when prometheus_client is imported: made the multiprocess
    # one even if something imported the library before the variable was set. A new one for
    # each app: it opens its files afresh, should another process of the same server have
    # emptied the directory (prepare_dir) since the last app was built.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # not annotated upstream
    return chosen


class Metrics:
    """The relay's metrics for one app; every recording method is cheap and never raises.

    `known_models` (provider -> the model names it may label) and `known_tools` (the app's
    tools) bound the label values: anything else is "other"."""

    def __init__(self, directory: str, known_models: Mapping[str, Collection[str]] | None = None,
                 known_tools: Collection[str] = ()) -> None:
        directory = process_directory(directory)
        prepare_dir(directory)
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.directory = directory
        self._client = prometheus_client
        # Metrics live in a registry of their own (the default one would double them).
        r = CollectorRegistry()
        self.streams_open = Gauge("relay_streams_open", "Answers streaming now", ["transport"],
                                  multiprocess_mode="livesum", registry=r)
        self.answers = Counter("relay_answers", "Answers ended (streamed or not)",
                               ["transport", "provider", "model", "outcome"], registry=r)
        self.ttft = Histogram("relay_time_to_first_token_seconds", "From the request to the first text",
                              ["provider"], buckets=TTFT_BUCKETS, registry=r)
        self.duration = Histogram("relay_answer_duration_seconds", "From the request to the end of the answer",
                                  ["transport", "provider"], buckets=DURATION_BUCKETS, registry=r)
        self.tokens = Counter("relay_tokens", "Text deltas relayed", ["provider"], registry=r)
        self.upstream_errors = Counter("relay_upstream_errors", "Answers that ended in an upstream error",
                                       ["provider", "type"], registry=r)
        self.retries = Counter("relay_upstream_retries", "Upstream calls retried before the first token",
                               ["provider"], registry=r)
        self.failovers = Counter("relay_failovers", "Answers taken over by the next provider",
                                 ["from_provider", "to_provider"], registry=r)
        self.tool_calls = Counter("relay_tool_calls", "Server-side tool calls", ["tool", "status"], registry=r)
        self.refusals = Counter("relay_refusals", "Requests refused by a limit", ["reason"], registry=r)
        self.store_errors = Counter("relay_store_errors", "Store operations that failed", registry=r)
        self.known_models: Mapping[str, Collection[str]] = known_models or {}
        self.known_tools = known_tools

    def model_label(self, provider: str, model: str) -> str:
        return bounded(model, self.known_models.get(provider, ()))

    def provider_label(self, provider: str) -> str:
        return bounded(provider, self.known_models)

    def stream_opened(self, transport: str) -> None:
        self.streams_open.labels(bounded(transport, TRANSPORTS)).inc()

    def stream_closed(self, transport: str) -> None:
        self.streams_open.labels(bounded(transport, TRANSPORTS)).dec()

    def answer_ended(self, transport: str, provider: str, model: str, answer: Any, started: float,
                     first_token_at: float | None, tokens: int) -> None:
        """Everything an ended answer tells (its outcome, timings, errors, tools, failovers)."""
        try:
            model = self.model_label(provider, model)
            provider, transport = self.provider_label(provider), bounded(transport, TRANSPORTS)
            self.answers.labels(transport, provider, model, bounded(answer.outcome, OUTCOMES)).inc()
            now = time.monotonic()
            self.duration.labels(transport, provider).observe(now - started)
            if first_token_at is not None:
                self.ttft.labels(provider).observe(first_token_at - started)
            if tokens:
                self.tokens.labels(provider).inc(tokens)
            error = answer.error or {}
            if str(error.get("type", "")).startswith("upstream_"):
                self.upstream_errors.labels(provider, bounded(error["type"], UPSTREAM_ERRORS)).inc()
            if answer.retries:
                self.retries.labels(provider).inc(answer.retries)
            for switch in answer.failovers:
                self.failovers.labels(self.provider_label(switch["from"].partition("/")[0]),
                                      self.provider_label(switch["to"].partition("/")[0])).inc()
            for record in answer.tool_records:
                self.tool_calls.labels(bounded(record["name"], self.known_tools),
                                       bounded(record["status"], TOOL_STATUSES)).inc()
        except Exception:  # metrics must never break an answer
            pass

    def refused(self, reason: str) -> None:
        # Called by app.access with its own constants (a limit's name), never a client's words.
        self.refusals.labels(reason).inc()

    def store_failed(self) -> None:
        self.store_errors.inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format, summed over every process of this server."""
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]  # idem
        return self._client.generate_latest(registry), self._client.CONTENT_TYPE_LATEST

