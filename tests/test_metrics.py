"""Prometheus metrics: exact counts after known traffic, across the processes of one server,
read back with prometheus_client's own parser."""

from __future__ import annotations

import concurrent.futures
import os

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, open_stream, provider_env, wait_until
from tests.fake_upstream import BODIES, Reply
from tests.servers import gunicorn

DEMO = {"prompt": "hi", "model": "demo-fast"}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def test_known_traffic_gives_exact_counts(make_app, serve, upstream):
    # The test process hosts many apps; their metrics share its one directory: count the difference.
    url = serve(make_app(RATE_LIMIT="5/minute", UPSTREAM_MAX_RETRIES=1, UPSTREAM_RETRY_BASE_SECONDS=0.01))
    before = samples(requests.get(f"{url}/metrics", timeout=10).text)
    for _ in range(3):
        assert requests.post(f"{url}/api/chat", json=DEMO, timeout=10).status_code == 200
    upstream.reset(Reply(status=503, content_type="application/json", chunks=[b'{"error": {"message": "x"}}']),
                   Reply(chunks=BODIES["openai"](["a", "b", "c"])))
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert events[-1].event == "done"
    upstream.reset(Reply(status=400, content_type="application/json", chunks=[b'{"error": {"message": "bad"}}']))
    open_stream(f"{url}/api/chat/stream?provider=anthropic&prompt=hi").read_all()
    assert requests.post(f"{url}/api/chat", json=DEMO, timeout=10).status_code == 429  # the 6th request
    after = samples(requests.get(f"{url}/metrics", timeout=10).text)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("relay_answers_total", transport="rest", provider="demo", outcome="done") == 3
    assert delta("relay_answers_total", transport="sse", provider="openai", model="gpt-4.1-mini",
                 outcome="done") == 1
    assert delta("relay_answers_total", transport="sse", provider="anthropic", outcome="error") == 1
    assert delta("relay_upstream_errors_total", provider="anthropic", type="upstream_error") == 1
    assert delta("relay_upstream_retries_total", provider="openai") == 1
    assert delta("relay_tokens_total", provider="openai") == 3
    assert delta("relay_time_to_first_token_seconds_count", provider="openai") == 1
    assert delta("relay_refusals_total", reason="rate_limited") == 1
    assert delta("relay_streams_open") == 0


def test_metrics_are_protected(make_app):
    open_ = make_app(API_TOKENS="api").test_client()
    assert open_.get("/metrics").status_code == 401
    assert open_.get("/metrics", headers={"Authorization": "Bearer api"}).status_code == 200
    own = make_app(API_TOKENS="api", METRICS_TOKEN="scrape").test_client()
    assert own.get("/metrics", headers={"Authorization": "Bearer api"}).status_code == 401
    scraped = own.get("/metrics", headers={"Authorization": "Bearer scrape"})
    assert scraped.status_code == 200 and scraped.content_type.startswith("text/plain")


def test_a_new_server_starts_from_zero_a_worker_does_not(tmp_path, monkeypatch):
    from app import metrics

    directory = tmp_path / "m"
    metrics.prepare_dir(str(directory))
    (directory / "counter_123.db").write_bytes(b"x")
    metrics.prepare_dir(str(directory))  # another worker of the same server
    assert (directory / "counter_123.db").exists()
    monkeypatch.setattr(os, "getppid", lambda: 999_999)  # a restarted server
    metrics.prepare_dir(str(directory))
    assert not (directory / "counter_123.db").exists()


def test_exact_counts_across_two_gunicorn_workers(fake_upstream, upstream, tmp_path):
    directory = tmp_path / "metrics"
    server = gunicorn(free_port(), {**provider_env(fake_upstream.url), "WEB_CONCURRENCY": "2",
                                    "METRICS_DIR": str(directory), "MAX_STREAMS_PER_CLIENT": "0",
                                    "STORE_URL": f"sqlite:///{tmp_path}/relay.sqlite3"})
    try:
        sent = 0

        def writers() -> set[str]:
            return {name.rsplit("_", 1)[1] for name in os.listdir(directory) if name.startswith("counter_")}

        # Rounds of concurrent requests on new connections, until both workers answered some.
        def one(_) -> int:
            return requests.post(f"{server.url}/api/chat", json=DEMO, timeout=10,
                                 headers={"Connection": "close"}).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            while sent < 160 and len(writers()) < 2:
                assert set(pool.map(one, range(16))) == {200}
                sent += 16
        assert len(writers()) == 2, "one worker served everything"
        upstream.reset(Reply(chunks=BODIES["openai"](["x", "y"])))
        for _ in range(4):
            open_stream(f"{server.url}/api/chat/stream?provider=openai&prompt=hi",
                        headers={"Connection": "close"}).read_all()
        wait_until(lambda: value(samples(requests.get(f"{server.url}/metrics", timeout=10).text),
                                 "relay_streams_open") == 0, what="streams to be counted closed")
        found = samples(requests.get(f"{server.url}/metrics", timeout=10).text)
        assert value(found, "relay_answers_total", transport="rest", outcome="done") == sent
        assert value(found, "relay_answers_total", transport="sse", provider="openai") == 4
        assert value(found, "relay_tokens_total", provider="openai") == 8
    finally:
        server.stop()


def test_labels_stay_bounded_whatever_the_model_or_client_names(make_app, serve, upstream):
    """Attack: a prompt makes the model call a tool named `zz_<random>`; each name was a new
    `relay_tool_calls_total{tool=…}` series, kept until restart. Models a caller may name
    freely (ALLOWED_MODELS=openai/*) must not make series either."""
    import secrets

    from tests.fake_upstream import openai_tool_call_body

    url = serve(make_app(ALLOWED_MODELS="openai/*"))
    names = [f"zz_{secrets.token_hex(6)}" for _ in range(2)]
    models = [f"model-{secrets.token_hex(6)}" for _ in range(2)]
    for name, model in zip(names, models, strict=True):
        calls = [("c1", name, "{}"), ("c2", "calculate", '{"expression": "1+1"}')]
        upstream.reset(Reply(chunks=openai_tool_call_body(calls)),
                       Reply(chunks=BODIES["openai"](["done"])))
        answer = requests.post(f"{url}/api/chat", json={"provider": "openai", "prompt": "hi", "model": model,
                                                        "tools": ["calculate"]}, timeout=10)
        assert answer.status_code == 200 and answer.json()["content"] == "done"
    text = requests.get(f"{url}/metrics", timeout=10).text
    for chosen in (*names, *models):
        assert chosen not in text
    found = samples(text)
    assert value(found, "relay_tool_calls_total", tool="other", status="error") >= 2
    assert value(found, "relay_tool_calls_total", tool="calculate", status="done") >= 2
    assert value(found, "relay_answers_total", provider="openai", model="other") >= 2


def test_every_label_value_comes_from_a_closed_set():
    from types import SimpleNamespace

    from app.metrics import Metrics

    metrics = Metrics(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or "/tmp/relay-metrics-label-test",
                      known_models={"openai": {"gpt-4.1"}})
    answer = SimpleNamespace(outcome="weird-outcome-x1", error={"type": "upstream_made_up_x1"}, retries=0,
                             failovers=[{"from": "nope-x1/m", "to": "other-x1/m"}], tool_records=[])
    metrics.answer_ended("transport-x1", "provider-x1", "model-x1", answer, 0.0, None, 0)
    text = metrics.exposition()[0].decode()
    assert "x1" not in text


def test_the_metrics_directory_is_private_to_its_user(tmp_path, monkeypatch):
    """Finding (issue 20): the default METRICS_DIR is a predictable path in /tmp. Another user
    who made it first (or a symlink there) would get this server's processes writing files
    into a directory of theirs, and deleting files in one they chose: it must be ours alone."""
    import stat

    from app import metrics
    from app.config import ConfigError

    fresh = tmp_path / "fresh"
    metrics.prepare_dir(str(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    for mode in (0o777, 0o775, 0o1777):  # anyone (or the group) may add files or links
        shared = tmp_path / f"shared-{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        with pytest.raises(ConfigError, match="METRICS_DIR"):
            metrics.prepare_dir(str(shared))
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # as another user sees it
    with pytest.raises(ConfigError, match="METRICS_DIR.*another user"):
        metrics.prepare_dir(str(theirs))
    monkeypatch.undo()
    if os.geteuid() == 0:  # only root can give a symlink away: one of another user's, to our own directory
        link = tmp_path / "link"
        link.symlink_to(fresh)
        os.lchown(link, 65534, 65534)
        with pytest.raises(ConfigError, match="METRICS_DIR.*another user"):
            metrics.prepare_dir(str(link))
