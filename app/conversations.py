"""Conversation memory: the stored history of a chat, replayed (within a budget) to the model.

Every request goes through `begin` (history loaded, the new messages stored at once) and
`finish` (the assistant's record: done, stopped or failed, with its tool calls), whether
it streamed or not, so streamed and REST turns are stored the same way and mix freely.
Records are only ever appended, one by one, which keeps concurrent requests on one
conversation from corrupting it: their records interleave, each tagged with its request.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from app.chat_request import ChatRequest
from app.providers.base import Task
from app.relay import Answer, new_id
from app.store import Store


class Conversations:
    def __init__(self, store: Store, settings: Any) -> None:
        self.store = store
        self.max_messages = settings.HISTORY_MAX_MESSAGES
        self.max_chars = settings.HISTORY_MAX_CHARS
        self.ttl = settings.CONVERSATION_TTL

    def begin(self, chat: ChatRequest, request_id: str) -> tuple[str, Task]:
        """Store the request's messages; return the conversation id and the task to send."""
        conversation_id = chat.conversation_id or new_id()
        history = self.replayable(conversation_id) if chat.conversation_id else []
        now = time.time()
        for message in chat.task.messages:
            self.store.append_message(conversation_id, {**message, "request_id": request_id, "created": now}, self.ttl)
        return conversation_id, replace(chat.task, messages=self.bounded(history + chat.task.messages))

    def finish(self, conversation_id: str, request_id: str, answer: Answer, tools: list[dict[str, Any]]) -> None:
        """Store the assistant's turn, however it ended."""
        record: dict[str, Any] = {
            "role": "assistant", "content": answer.text, "status": answer.outcome,
            "finish_reason": answer.finish_reason, "usage": answer.usage,
            "request_id": request_id, "created": time.time(),
        }
        if tools:
            record["tools"] = tools
        if answer.error:
            record["error"] = answer.error
        self.store.append_message(conversation_id, record, self.ttl)

    def replayable(self, conversation_id: str) -> list[dict[str, str]]:
        """The stored turns as model messages (tool activity is summed up in the answers)."""
        return [{"role": r["role"], "content": r["content"]} for r in self.store.messages(conversation_id)
                if r.get("role") in ("user", "assistant") and r.get("content")]

    def bounded(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The most recent messages within the budget, starting with a user message."""
        kept: list[dict[str, Any]] = []
        chars = 0
        for message in reversed(messages):
            chars += len(message.get("content") or "")
            if kept and (len(kept) >= self.max_messages or chars > self.max_chars):
                break
            kept.append(message)
        kept.reverse()
        while len(kept) > 1 and kept[0].get("role") != "user":
            kept.pop(0)
        return kept
