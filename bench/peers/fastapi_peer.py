"""The peer: FastAPI + sse-starlette + httpx doing what /api/chat/stream does.

Same route, same events (msgid, token, done, with ids and JSON data), heartbeats on,
the upstream closed when the client leaves (sse-starlette cancels the generator).

    OPENAI_BASE_URL=http://127.0.0.1:9100 uvicorn bench.peers.fastapi_peer:app --port 9300
"""

from __future__ import annotations

import json
import os
import secrets

import httpx
from fastapi import FastAPI
from sse_starlette.sse import EventSourceResponse

BASE = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:9100")
app = FastAPI()
client = httpx.AsyncClient(base_url=BASE, timeout=httpx.Timeout(10.0, read=120.0),
                           limits=httpx.Limits(max_connections=None, max_keepalive_connections=100))


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@app.get("/api/chat/stream")
async def chat_stream(prompt: str, provider: str = "openai", model: str = "m") -> EventSourceResponse:
    async def events():
        stream_id = secrets.token_urlsafe(16)
        n = 1
        msgid = {"id": stream_id, "provider": provider, "model": model}
        yield {"id": str(n), "event": "msgid", "data": json.dumps(msgid)}
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
        finish, usage = "stop", None
        async with client.stream("POST", "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        n += 1
                        yield {"id": str(n), "event": "token", "data": json.dumps({"text": text}, ensure_ascii=False)}
                    finish = choice.get("finish_reason") or finish
        yield {"id": str(n + 1), "event": "done", "data": json.dumps({"finish_reason": finish, "usage": usage})}

    return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-cache, no-transform",
                                                            "X-Accel-Buffering": "no"})
