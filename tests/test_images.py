"""Images in: checked once (app/images.py), translated per provider, never fetched by the relay.

Unit tests read real headers of the four formats and refuse what is not one of them; route
tests send images through every way in (the relay API, `/v1/chat/completions` with the
official SDK, `/api/chat/ui`) and look at what reached the fake upstream in each provider's
own format; a URL pointing at a listener here proves the relay never fetches it.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import zlib

import openai
import pytest

from app import images
from app.errors import ApiError
from tests.fake_upstream import BODIES, Reply


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x3b"


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


def webp(width: int, height: int, kind: str = "VP8X") -> bytes:
    if kind == "VP8X":
        chunk = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") \
            + (height - 1).to_bytes(3, "little")
    elif kind == "VP8L":
        bits = (width - 1) | ((height - 1) << 14)
        chunk = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + bits.to_bytes(4, "little")
    else:
        chunk = b"VP8 " + struct.pack("<I", 10) + b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


PNG = png(3, 2)
PNG_URL = data_url("image/png", PNG)


# ------------------------------------------------------------------ reading and refusing


@pytest.mark.parametrize("data, media_type, size", [
    (png(3, 2), "image/png", (3, 2)), (gif(640, 480), "image/gif", (640, 480)),
    (jpeg(1024, 768), "image/jpeg", (1024, 768)), (webp(17, 9), "image/webp", (17, 9)),
    (webp(300, 200, "VP8L"), "image/webp", (300, 200)), (webp(320, 240, "VP8 "), "image/webp", (320, 240)),
])
def test_the_header_says_format_and_size(data, media_type, size):
    seen = images.picture(data)
    assert (seen.media_type, seen.width, seen.height) == (media_type, *size)
    part = images.url_part(data_url(media_type, data), "m", 5_000_000)
    assert part == {"type": "image", "media_type": media_type, "data": base64.b64encode(data).decode()}


@pytest.mark.parametrize("url, kind", [
    ("data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode(),
     "PNG, JPEG, GIF or WebP"),
    ("data:application/pdf;base64," + base64.b64encode(b"%PDF-1.7\n").decode(), "PNG, JPEG, GIF or WebP"),
    ("data:text/html;base64," + base64.b64encode(b"<script>alert(1)</script>").decode(), "PNG, JPEG, GIF or WebP"),
    (data_url("image/png", b"<svg xmlns='http://www.w3.org/2000/svg'/>"), "not the PNG image it claims"),
    (data_url("image/jpeg", PNG), "not the JPEG image it claims"),
    (data_url("image/png", PNG[:20]), "not the PNG image it claims"),  # a header cut short
    ("data:image/png;base64,iVBORw0KGgo*&^%", "not valid base64"),
    ("data:image/png,rawbytes", "data:<image type>;base64"),
    ("http://example.com/cat.png", "https URL"),
    ("https://user:secret@example.com/cat.png", "https URL"),
    ("javascript:alert(1)", "https URL"),
    ("file:///etc/passwd", "https URL"),
    ("https://example.com/" + "a" * 3000, "at most 2048"),
    ("https://exa mple.com/x.png", "https URL"),
])
def test_what_is_not_an_image_it_claims_is_refused(url, kind):
    with pytest.raises(ApiError) as refused:
        images.url_part(url, "messages[0].content[1]", 5_000_000)
    assert refused.value.status == 400 and kind in refused.value.message
    assert "messages[0].content[1]" in refused.value.message


def test_an_image_over_its_limit_is_refused_before_it_is_decoded():
    with pytest.raises(ApiError) as refused:
        images.url_part(data_url("image/png", png(3, 3) + b"\x00" * 2000), "m", 1000)
    assert refused.value.status == 413


def test_url_safe_base64_without_padding_is_read_and_sent_back_standard():
    loose = base64.urlsafe_b64encode(jpeg(8, 8)).decode().rstrip("=")
    part = images.url_part(f"data:image/jpeg;base64,{loose}", "m", 5_000_000)
    assert base64.b64decode(part["data"], validate=True) == jpeg(8, 8)


# ------------------------------------------------------------------ through every way in


def user_with_image(url: str = PNG_URL, text: str = "what is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_the_demo_sees_the_image_it_is_sent(client):
    response = client.post("/api/chat", json={"messages": user_with_image(data_url("image/gif", gif(640, 480)))})
    assert response.status_code == 200, response.get_json()
    assert "a GIF image of 640×480 pixels" in response.get_json()["content"]


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini", "mistral"])
def test_an_image_reaches_each_provider_in_its_own_format(provider, make_app, upstream):
    upstream.reset(Reply(chunks=BODIES[provider](["a cat"])))
    app = make_app()
    response = app.test_client().post("/api/chat", json={"provider": provider, "messages": user_with_image()})
    assert response.status_code == 200, response.get_json()
    body = upstream.last().body
    b64 = base64.b64encode(PNG).decode()
    if provider in ("openai", "mistral"):
        assert body["messages"][-1]["content"] == [{"type": "text", "text": "what is this?"},
                                                   {"type": "image_url", "image_url": {"url": PNG_URL}}]
    elif provider == "anthropic":
        assert body["messages"][-1]["content"] == [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}]
    else:
        assert body["contents"][-1]["parts"] == [{"text": "what is this?"},
                                                 {"inlineData": {"mimeType": "image/png", "data": b64}}]


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections: what a fetch of a URL would hit."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def test_an_image_url_goes_to_the_provider_and_is_never_fetched_by_the_relay(make_app, upstream):
    listener = Listener()
    try:
        url = f"https://127.0.0.1:{listener.port}/cat.png"
        app = make_app()
        upstream.reset(Reply(chunks=BODIES["anthropic"](["a cat"])))
        response = app.test_client().post("/api/chat", json={"provider": "anthropic", "messages": user_with_image(url)})
        assert response.status_code == 200, response.get_json()
        assert upstream.last().body["messages"][-1]["content"][1] == {"type": "image",
                                                                      "source": {"type": "url", "url": url}}
        upstream.reset(Reply(chunks=BODIES["openai"](["a cat"])))
        response = app.test_client().post("/api/chat", json={"provider": "openai", "messages": user_with_image(url)})
        assert upstream.last().body["messages"][-1]["content"][1]["image_url"]["url"] == url
        response = app.test_client().post("/api/chat", json={"provider": "gemini", "messages": user_with_image(url)})
        assert response.status_code == 400
        assert "data: URLs only" in response.get_json()["error"]["message"]
        response = app.test_client().post("/api/chat", json={"provider": "demo", "messages": user_with_image(url)})
        assert "which I do not fetch" in response.get_json()["content"]
    finally:
        listener.close()
    assert listener.accepted == 0


def test_too_many_or_too_large_images_are_refused(make_app):
    app = make_app(MAX_IMAGES=2, MAX_IMAGE_BYTES=2000, MAX_IMAGE_TOTAL_BYTES=3000)
    web = app.test_client()
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}] * 3}]
    response = web.post("/api/chat", json={"messages": three})
    assert response.status_code == 413 and response.get_json()["error"]["type"] == "too_many_images"
    big = data_url("image/png", png(40, 40) + b"\x00" * 1500)
    response = web.post("/api/chat", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": big}}, {"type": "image_url", "image_url": {"url": big}}]}]})
    assert response.status_code == 413 and response.get_json()["error"]["type"] == "image_too_large"
    # An image in a role that takes none, or a part of another kind: a clear 400.
    response = web.post("/api/chat", json={"messages": [{"role": "system", "content": [{"type": "text", "text": "x"}]},
                                                        *user_with_image()]})
    assert response.status_code == 400
    response = web.post("/api/chat", json={"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]})
    assert response.status_code == 400 and "image_url" in response.get_json()["error"]["message"]


def test_the_body_limit_grows_with_the_image_limits(make_app):
    app = make_app(MAX_BODY_BYTES=2000, MAX_PROMPT_CHARS=1000, MAX_IMAGE_TOTAL_BYTES=8000)
    image = data_url("image/png", png(200, 200) + bytes(range(256)) * 12)  # trailing bytes: no compression
    assert len(image) > 4000
    response = app.test_client().post("/api/chat", json={"messages": user_with_image(image)})
    assert response.status_code == 200, response.get_json()
    assert "a PNG image of 200×200 pixels" in response.get_json()["content"]
    response = app.test_client().post("/api/chat", json={"prompt": "x" * 3000})
    assert response.status_code == 413  # text is still held to MAX_PROMPT_CHARS
    response = app.test_client().post("/api/chat", json={"prompt": "x", "system": "y" * 20_000})
    assert response.status_code == 413  # and no body past MAX_BODY_BYTES plus the images' room (12,666)
    assert "request body is larger than 12666 bytes" in response.get_json()["error"]["message"]


def test_openai_sdk_sends_an_image_through_v1(live, upstream):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["a ", "cat"])))
    client = openai.OpenAI(base_url=f"{live()}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="anthropic/claude-sonnet-4-5", stream=True,
                                            messages=user_with_image())
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "a cat"
    block = upstream.last().body["messages"][-1]["content"][1]
    assert block["source"] == {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=user_with_image(
            data_url("image/png", b"%PDF-1.7 not a picture")))
    assert "not the PNG image it claims" in str(refused.value)


def test_ai_sdk_file_parts_with_an_image_reach_the_model(client):
    message = {"id": "u1", "role": "user", "parts": [
        {"type": "text", "text": "look"},
        {"type": "file", "mediaType": "image/webp", "filename": "x.webp", "url": data_url("image/webp", webp(17, 9))}]}
    response = client.post("/api/chat/ui", json={"id": "c1", "messages": [message], "trigger": "submit-message"})
    assert response.status_code == 200
    text = "".join(json.loads(line[6:]).get("delta", "") for line in response.get_data(as_text=True).splitlines()
                   if line.startswith("data: {"))
    assert "a WebP image of 17×9 pixels" in text
    pdf = {**message, "parts": [{"type": "file", "mediaType": "application/pdf",
                                 "url": "data:application/pdf;base64,JVBE"}]}
    response = client.post("/api/chat/ui", json={"id": "c1", "messages": [pdf], "trigger": "submit-message"})
    assert response.status_code == 400 and "image files" in response.get_json()["error"]["message"]


def test_later_turns_send_the_image_again_and_it_is_stored_once(make_app, upstream):
    app = make_app()
    web = app.test_client()
    upstream.reset(Reply(chunks=BODIES["openai"](["a cat"])))
    first = web.post("/api/chat", json={"provider": "openai", "messages": user_with_image()}).get_json()
    upstream.reset(Reply(chunks=BODIES["openai"](["black"])))
    web.post("/api/chat", json={"provider": "openai", "prompt": "what colour?",
                                "conversation_id": first["conversation_id"]})
    sent = upstream.last().body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"][1] == {"type": "image_url", "image_url": {"url": PNG_URL}}
    records = web.get(f"/api/conversations/{first['conversation_id']}").get_json()["messages"]
    stored = json.dumps(records)
    assert stored.count(base64.b64encode(PNG).decode()) == 1
