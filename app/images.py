"""Images that clients attach to a message: checked here, once, before anything is stored or
sent upstream.

Every way in (the relay API, `/v1/chat/completions`, `/api/chat/ui`, `/v1/messages`) turns
its own image shape into one neutral part (see `Task` in app/providers/domain.py):
`{"type": "image", "media_type", "data"}` for bytes the client sent (base64) or
`{"type": "image", "url"}` for an https URL. The relay never fetches a URL itself (no
server-side request forgery): a URL goes to the provider as it is, and a provider that
cannot take one is refused with a 400 before the call.

Bytes are trusted only after they prove what they claim: the base64 must be strict, the
decoded bytes must start with the signature of the claimed type (PNG, JPEG, GIF, WebP;
SVG, PDF and HTML are refused, since a browser or model would read them as documents), and
the picture's size is read from its header, which also shows the header is whole.
"""

from __future__ import annotations

import binascii
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.errors import ApiError

# The four formats every provider we relay takes (PROVIDERS.md, images).
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WebP"}
MAX_URL_CHARS = 2048
_DATA_URL = re.compile(r"data:(?P<type>[a-z]+/[a-z0-9.+-]+)(?P<params>(?:;[a-z0-9_.-]+=[^;,]*)*);base64,(?P<data>.*)",
                       re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Picture:
    """What an image's header says: its format and size in pixels."""

    media_type: str
    width: int
    height: int

    @property
    def format(self) -> str:
        return IMAGE_TYPES[self.media_type]


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


# ------------------------------------------------------------------ reading headers


def _png(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def _gif(data: bytes) -> tuple[int, int] | None:
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    return None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    """The frame size from the first start-of-frame marker (SOF0-SOF15 but DHT, JPG, DAC)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if length < 2:
            return None
        i += 2 + length
    return None


def _webp(data: bytes) -> tuple[int, int] | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 25:
        return None
    chunk = data[12:16]
    # lossy: a key frame's start code, then 14-bit sizes
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a" and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: 14-bit width-1 and height-1, packed
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:  # extended: 24-bit canvas width-1 and height-1
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


_READERS = {"image/png": _png, "image/jpeg": _jpeg, "image/gif": _gif, "image/webp": _webp}


def picture(data: bytes) -> Picture | None:
    """The format and pixel size of image bytes, or None when they are none of the four formats
    (or their header is cut short)."""
    for media_type, read in _READERS.items():
        size = read(data)
        if size is not None and size[0] > 0 and size[1] > 0:
            return Picture(media_type, *size)
    return None


# ------------------------------------------------------------------ client input


def decode_base64(data: str, where: str) -> bytes:
    """Strict base64 (the standard alphabet, or the URL-safe one some SDKs send), padding optional."""
    if not isinstance(data, str) or not data.isascii():
        raise invalid(f"{where}: the image data must be base64 text")
    text = data.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where}: the image data is not valid base64") from None


def base64_part(media_type: Any, data: Any, where: str, max_bytes: int) -> dict[str, Any]:
    """Image bytes a client sent as base64, with the type it claims, as a neutral part."""
    if not isinstance(media_type, str) or media_type.lower() not in IMAGE_TYPES:
        raise invalid(f"{where}: images must be PNG, JPEG, GIF or WebP (got {str(media_type)[:40]!r})")
    if not isinstance(data, str):
        raise invalid(f"{where}: the image data must be base64 text")
    if len(data) > max_bytes * 4 // 3 + 4:  # refuse before decoding a huge string
        raise ApiError(413, "image_too_large", f"{where}: an image may be at most {max_bytes} bytes")
    raw = decode_base64(data, where)
    if len(raw) > max_bytes:
        raise ApiError(413, "image_too_large", f"{where}: an image may be at most {max_bytes} bytes")
    seen = picture(raw)
    if seen is None or seen.media_type != media_type.lower():
        raise invalid(f"{where}: the data is not the {IMAGE_TYPES[media_type.lower()]} image it claims to be")
    return {"type": "image", "media_type": seen.media_type, "data": binascii.b2a_base64(raw, newline=False).decode()}


def url_part(url: Any, where: str, max_bytes: int) -> dict[str, Any]:
    """An image given as a URL: a `data:` URL is checked like any base64 image; an https URL is
    kept as it is, for the provider to fetch (the relay never does)."""
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}: the image URL must be a string")
    if url[:5].lower() == "data:":
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise invalid(f"{where}: a data: URL must be data:<image type>;base64,<data>")
        return base64_part(match["type"], match["data"], where, max_bytes)
    if len(url) > MAX_URL_CHARS or not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        raise invalid(f"{where}: the image URL must be an https URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host = None
    if parts.scheme.lower() != "https" or not host or parts.username is not None or parts.password is not None:
        raise invalid(f"{where}: an image must be a data: URL (PNG, JPEG, GIF, WebP) or an https URL")
    return {"type": "image", "url": url}


def openai_content(content: Any, where: str, max_bytes: int, images: bool = True) -> str | list[dict[str, Any]]:
    """OpenAI chat content (a string, or `text` and `image_url` parts) as neutral content: a
    string when it holds text only, else a list of text and image parts. `images=False` for a
    role that takes none (system, assistant, tool)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise ApiError(400, "invalid_request", f"{where}: content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image  # some clients send the URL itself
            parts.append(url_part(url, f"{where}.content[{i}]", max_bytes))
        else:
            allowed = "text and image_url parts" if images else "text parts"
            raise ApiError(400, "invalid_request", f"{where}: only {allowed} are supported here "
                                                   f"(got {str(kind or type(part).__name__)[:40]!r})")
    return neutral_content(parts)


def neutral_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Parts as the neutral content: a plain string when there is no image (what every adapter
    and record already handles), else the list."""
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


# ------------------------------------------------------------------ reading neutral content


def text_of(content: Any) -> str:
    """The text of neutral content (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def images_in(messages: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every image part of neutral messages, in order."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            yield from (p for p in content if isinstance(p, dict) and p.get("type") == "image")


def image_bytes(part: dict[str, Any]) -> int:
    """What an image part weighs as sent: its base64 text, or its URL."""
    return len(part.get("data") or part.get("url") or "")


def check_images(messages: list[dict[str, Any]], max_images: int, max_total_bytes: int) -> None:
    """The request's images, history included, within the per-request limits."""
    count = total = 0
    for part in images_in(messages):
        count += 1
        total += image_bytes(part)
    if count > max_images:
        raise ApiError(413, "too_many_images", f"a request may carry at most {max_images} images (it has {count})")
    if total > max_total_bytes * 4 // 3 + 4 * count:
        raise ApiError(413, "image_too_large", f"the request's images are over {max_total_bytes} bytes together")


def describe(part: dict[str, Any]) -> str:
    """A line about one image part, from its header (what the demo provider "sees")."""
    if part.get("url"):
        host = urlsplit(part["url"]).hostname or "?"
        return f"an image at {host}, which I do not fetch"
    seen = picture(decode_base64(part.get("data") or "", "image"))
    if seen is None:
        return "an image I cannot read"
    return f"a {seen.format} image of {seen.width}×{seen.height} pixels"
