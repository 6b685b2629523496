"""Conversation memory: the stored history of a chat, replayed (within a budget) to the model.

Every request goes through `begin` (history loaded, the new messages stored at once) and
`finish` (the assistant's record: done, stopped or failed, with its tool calls), whether
it streamed or not, so streamed and REST turns are stored the same way and mix freely.
Records are only ever appended, which keeps concurrent requests on one conversation from
corrupting it: their records interleave, each tagged with its request.

A conversation belongs to the caller that started it: its id is issued here, never
chosen by a client, and under auth nobody else can read, continue or delete it (they
get the same 404 as for an id that does not exist). Its size is capped, and a turn
loads only the recent records it may replay, never the whole conversation. A deleted
conversation stays deleted: the store keeps a tombstone that refuses the record of an
answer still running when it was deleted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from app.access import Access, Caller
from app.chat_request import ChatRequest
from app.config import Settings
from app.errors import ApiError
from app.images import image_bytes, images_in, text_of
from app.providers.domain import Task
from app.relay import Answer, new_id
from app.store.base import ConversationInfo, ConversationStore, Ticket, to_json
from app.tools import neutral_call

NOT_FOUND = "no such conversation"


class Conversations:
    def __init__(self, store: ConversationStore, settings: Settings, access: Access) -> None:
        self.store = store
        self.access = access
        self.max_messages = settings.HISTORY_MAX_MESSAGES
        self.max_chars = settings.HISTORY_MAX_CHARS
        self.ttl = settings.CONVERSATION_TTL
        self.cap_messages = settings.MAX_CONVERSATION_MESSAGES
        self.cap_bytes = settings.MAX_CONVERSATION_BYTES
        self.max_images = settings.MAX_IMAGES
        self.max_image_bytes = settings.MAX_IMAGE_TOTAL_BYTES * 4 // 3  # as sent: base64

    def begin(self, caller: Caller, chat: ChatRequest, request_id: str,
              ticket: Callable[[str, int], Ticket] | None = None) -> tuple[str, Task, int]:
        """Store the request's messages; return the conversation id, the task to send, and the
        conversation's length after them (where a POST-SSE ticket's history ends).

        `ticket(conversation_id, length)`, for a request that starts a conversation only, is the
        POST-SSE ticket to store with its messages, in the same write."""
        now = time.time()
        new = chat.records if chat.records is not None else chat.task.messages
        records = [{**message, "request_id": request_id, "created": now} for message in new]
        history: list[dict[str, Any]] = []
        if chat.conversation_id is None:
            conversation_id = new_id()
            kept = None if ticket is None else ticket(conversation_id, len(records))
            stored = self.store.start_conversation(conversation_id, records, self.ttl, caller.id, kept)
        elif ticket is not None:
            raise ValueError("a ticket is stored with the messages of a new conversation only")
        else:
            conversation_id = chat.conversation_id
            info = self.owned(caller, conversation_id)
            size = sum(len(to_json(r).encode()) for r in records)
            if info.messages + len(records) > self.cap_messages or info.bytes + size > self.cap_bytes:
                raise ApiError(413, "conversation_too_large",
                               f"this conversation reached its size limit ({self.cap_messages} messages or "
                               f"{self.cap_bytes} bytes); start a new conversation")
            history = self.replayable(self.store.messages(conversation_id, max(0, info.messages - self.max_messages)))
            appended = self.store.append_messages(conversation_id, records, self.ttl, owner=caller.id)
            if appended is None:  # deleted since it was looked up
                raise ApiError(404, "not_found", NOT_FOUND)
            stored = appended
        new = chat.task.messages
        history = self.bounded(history, reserve=sum(len(text_of(m.get("content"))) for m in new), reserved=len(new),
                               images_reserved=list(images_in(new)))
        return conversation_id, replace(chat.task, messages=history + new), stored.messages

    def history_at(self, conversation_id: str, position: int, request_id: str) -> list[dict[str, Any]]:
        """The messages to send for a request accepted earlier (a POST-SSE ticket opened now):
        the conversation up to where that request's own messages end."""
        records = self.store.messages(conversation_id, max(0, position - self.max_messages), position)
        messages = self.bounded(self.replayable(records, request_id))
        if not messages or messages[-1].get("role") != "user":
            raise ApiError(404, "not_found", "the conversation of this stream was deleted")
        return messages

    def finish(self, conversation_id: str, request_id: str, answer: Answer, owner: str,
               releasing: tuple[tuple[str, str] | None, str] | None = None) -> None:
        """Store the assistant's turn, however it ended (not kept when the conversation was
        deleted meanwhile: its tombstone refuses it). `releasing`: a POST-SSE stream's slot and
        adoption record, given back with it in the same write (`append_message_releasing`)."""
        record: dict[str, Any] = {
            "role": "assistant", "content": answer.text, "status": answer.outcome,
            "finish_reason": answer.finish_reason, "usage": answer.usage,
            "request_id": request_id, "created": time.time(),
        }
        if answer.tool_records:
            record["tools"] = answer.tool_records
            record["tool_messages"] = answer.tool_messages  # replayed to the model in later turns
        if answer.reasoning:  # the model's visible thinking, apart from the answer
            record["reasoning"] = answer.reasoning_text
        if answer.signed:  # provider reasoning state, sent back to that provider in later turns
            record["signed"] = answer.signed
        if answer.tool_calls:  # calls the model made of tools the client defined
            record["tool_calls"] = [neutral_call(c) for c in answer.tool_calls]
        if answer.error:
            record["error"] = answer.error
        if answer.failovers:  # who wrote which part: each entry says after how many characters
            record["failover"] = answer.failovers
        if releasing is None:
            self.store.append_message(conversation_id, record, self.ttl, owner=owner)
        else:
            self.store.append_message_releasing(conversation_id, record, self.ttl, owner, *releasing)

    def owned(self, caller: Caller | None, conversation_id: str) -> ConversationInfo:
        """The conversation's info, if it exists and `caller` may use it; else the same 404."""
        info = self.store.conversation(conversation_id)
        if info is None or not self.access.owns(caller, info.owner):
            raise ApiError(404, "not_found", NOT_FOUND)
        return info

    def read(self, caller: Caller | None, conversation_id: str) -> list[dict[str, Any]]:
        self.owned(caller, conversation_id)
        return self.store.messages(conversation_id)

    def forget(self, caller: Caller | None, conversation_id: str) -> None:
        self.owned(caller, conversation_id)
        if not self.store.delete_conversation(conversation_id):
            raise ApiError(404, "not_found", NOT_FOUND)

    @staticmethod
    def replayable(records: list[dict[str, Any]], request_id: str | None = None) -> list[dict[str, Any]]:
        """Stored records as model messages, in the provider-neutral form: user and assistant
        turns, the tool rounds of an answer (its calls and their results, each provider gets
        them in its own format), tool results a client sent, and any system message of the
        request being answered."""
        messages: list[dict[str, Any]] = []
        for r in records:
            role = r.get("role")
            if role == "assistant":
                rounds = r.get("tool_messages") or []
                messages.extend(rounds)
                # The record's text is every round's text; the rounds already carry theirs.
                said = "".join(m.get("content") or "" for m in rounds if m.get("role") == "assistant")
                content = r.get("content") or ""
                content = content[len(said):] if content.startswith(said) else content
                calls = r.get("tool_calls")  # calls of client-defined tools (OpenAI API, AI SDK)
                turn: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    turn["tool_calls"] = calls
                if r.get("signed"):
                    turn["signed"] = r["signed"]
                if calls or content:
                    messages.append(turn)
            elif role == "tool":
                messages.append({k: r[k] for k in ("role", "tool_call_id", "name", "content", "is_error") if k in r})
            elif r.get("content") and (role == "user" or (role == "system" and r.get("request_id") == request_id)):
                messages.append({"role": role, "content": r["content"]})
        return messages

    def bounded(self, messages: list[dict[str, Any]], reserve: int = 0, reserved: int = 0,
                images_reserved: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The most recent stored messages within the history budget (less what the request's own
        `reserved` messages of `reserve` characters and `images_reserved` take), starting with a
        user message. Images are sent again with every turn, so older ones fall out of the history
        once the request's image limits are reached."""
        kept: list[dict[str, Any]] = []
        chars = reserve
        seen = list(images_reserved or ())
        for message in reversed(messages):
            chars += len(text_of(message.get("content")))
            if message.get("signed"):  # thinking blocks go back upstream with their turn
                chars += sum(len(to_json(s["item"])) for s in message["signed"])
            seen.extend(images_in([message]))
            if (kept or reserved) and (len(kept) + reserved >= self.max_messages or chars > self.max_chars
                                       or len(seen) > self.max_images
                                       or sum(map(image_bytes, seen)) > self.max_image_bytes):
                break
            kept.append(message)
        kept.reverse()
        # A history starts with a user turn, never inside a tool round (a result without its call).
        while kept and kept[0].get("role") != "user":
            kept.pop(0)
        return kept
