"""The real model server of scripts/local_model.py (llama.cpp, Gemma 3 270M) for tests:
started on a free port, asked directly, and watched through its `/slots` and `/metrics`."""

from __future__ import annotations

import json
import sys

import requests

from tests.conftest import free_port, wait_until
from tests.servers import REPO, ServerProcess

MODEL = "gemma-3-270m"


class LocalModel(ServerProcess):
    """One llama.cpp server process with one slot: a generation either runs or it does not."""

    health_path = "/health"  # 503 while the model loads

    def __init__(self) -> None:
        port = free_port()
        # One thread: llama.cpp's threads wait for each other at every step, so two threads
        # on two cores that other processes share ran 96 tokens in 1 to 5.4 s, one in 1.2 to 1.8 s.
        args = [sys.executable, str(REPO / "scripts" / "local_model.py"), "--port", str(port), "--threads", "1"]
        super().__init__(args, port, {}, startup=120)

    def generating(self) -> bool:
        """Whether its one slot is working on a request (`/slots`)."""
        slots = requests.get(f"{self.url}/slots", timeout=5).json()
        return any(slot["is_processing"] for slot in slots)

    def wait_idle(self, timeout: float = 15) -> None:
        wait_until(lambda: not self.generating(), timeout, "llama.cpp's slot to be idle", interval=0.05)

    def tokens_predicted(self) -> int:
        """Tokens generated since it started, stopped generations included (`/metrics`)."""
        for line in requests.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith("llamacpp:tokens_predicted_total "):
                return int(float(line.split()[1]))
        raise AssertionError("llama.cpp's /metrics has no tokens_predicted_total")

    def answer(self, wire: str, prompt: str, max_tokens: int) -> str:
        """A direct call at temperature 0, not streamed, in `wire` format (`openai` or `anthropic`)."""
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}
        if wire == "anthropic":
            reply = requests.post(f"{self.url}/v1/messages", json=body, timeout=60)
            reply.raise_for_status()
            return "".join(block["text"] for block in reply.json()["content"] if block["type"] == "text")
        reply = requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=60)
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"]

    def streamed(self, prompt: str, max_tokens: int, reasoning_effort: str) -> tuple[list[str], list[str]]:
        """A direct streamed call at temperature 0 that asks for reasoning: the pieces of
        `delta.reasoning_content` and of `delta.content`, in the order llama.cpp sent them."""
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "reasoning_effort": reasoning_effort}
        reasoning: list[str] = []
        content: list[str] = []
        with requests.post(f"{self.url}/v1/chat/completions", json=body, stream=True, timeout=60) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines(decode_unicode=True):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[len("data: "):])["choices"]:
                    if choice["delta"].get("reasoning_content"):
                        reasoning.append(choice["delta"]["reasoning_content"])
                    if choice["delta"].get("content"):
                        content.append(choice["delta"]["content"])
        return reasoning, content
