"""sdcore bridge protocol v1: framing, error codes and limits, shared by the server and every Python client.

This module uses only the standard library so that editor extensions (Krita's embedded Python) can carry a
copy of it. The protocol itself is specified in `docs/bridge-protocol.md`; the JSON schemas of its messages
are in `sdcore_bridges.schemas`.

Text frames are JSON objects `{v, type, id?, job?, seq?, data}`. Binary frames are

    offset 0   4 bytes  magic b"SDB1" ("sdcore bridge", protocol 1)
    offset 4   4 bytes  header length H, unsigned big-endian, 2 <= H <= MAX_BINARY_HEADER
    offset 8   H bytes  header: a UTF-8 JSON object (`type` is "blob" or "preview")
    offset 8+H          payload bytes (one chunk of a blob, or a whole preview image)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
BINARY_MAGIC = b"SDB1"
_HEAD = struct.Struct(">4sI")
MAX_BINARY_HEADER = 64 * 1024
MAX_ID_LENGTH = 128

# close codes (4000-4999 are free for applications)
CLOSE_SUPERSEDED = 4000  # the session was resumed on another connection
CLOSE_UNAUTHORIZED = 4001  # no or wrong token
CLOSE_INCOMPATIBLE = 4002  # no protocol version in common
CLOSE_HELLO_REQUIRED = 4003  # the first frame was not a valid hello, or it did not come in time
CLOSE_TOO_SLOW = 4004  # the client did not read its events and its send buffer overflowed
CLOSE_SESSION_ENDED = 4005  # the client said bye, or the server shut down

DEFAULT_LIMITS: dict[str, int] = {
    "max_text_frame": 1024 * 1024,  # bytes of one JSON text frame
    "max_binary_frame": 4 * 1024 * 1024 + MAX_BINARY_HEADER + 8,  # bytes of one binary frame (header included)
    "chunk_size": 1024 * 1024,  # payload bytes per blob frame the server sends
    "max_blob_bytes": 256 * 1024 * 1024,  # one uploaded blob
    "max_session_blob_bytes": 512 * 1024 * 1024,  # all blobs a session holds at once
    "max_blobs": 64,  # blobs a session holds at once
    "max_image_pixels": 4096 * 4096,
    "max_pending_jobs": 32,  # jobs of one session that are queued or running
    "max_sessions": 256,
    "replay_frames": 4096,  # frames kept for resume after they were sent (also bounded by replay_bytes)
    "replay_bytes": 512 * 1024 * 1024,
    "hello_timeout_s": 10,
    "session_ttl_s": 600,  # how long a disconnected session (and its events) is kept
    "result_ttl_s": 600,  # how long a finished job can still be subscribed to
    "ping_interval_s": 20,
    "transport_max_frame": 16 * 1024 * 1024,  # above this the websocket layer closes the connection (1009)
}

# client -> server message types that are requests (they carry an `id` and get one reply or error)
METHODS = (
    "submit", "cancel", "replace", "subscribe", "unsubscribe", "job_status", "list_jobs",
    "list_models", "list_samplers", "list_loras", "list_embeddings", "get_schema", "engine_info",
    "release", "bye",
)
# client -> server message types that are not requests
CLIENT_NOTICES = ("hello", "ping", "pong", "ack")
# job events (server -> client); `preview` travels as a binary frame
JOB_EVENTS = ("queued", "started", "progress", "preview", "result", "error", "cancelled")
TERMINAL_EVENTS = ("result", "error", "cancelled")

# error codes (`error.data.code`)
ERROR_CODES = {
    "bad_frame": "The frame is not valid protocol: not JSON, not an object, a bad binary header.",
    "unsupported_version": "The frame's `v` is not a protocol version this connection speaks.",
    "unknown_type": "The frame's `type` is not a message type of the protocol.",
    "unknown_method": "The request names a method nobody registered.",
    "invalid_params": "The request's `data` does not have the fields the method takes.",
    "invalid_request": "The generation request was refused by the engine (see the message).",
    "hello_required": "The first frame must be `hello`.",
    "already_hello": "`hello` was sent twice on one connection.",
    "incompatible_protocol": "The client and the server have no protocol version in common.",
    "unauthorized": "The token is missing or wrong.",
    "unknown_job": "No job with this id is visible to this session.",
    "unknown_blob": "No complete blob with this id is held by this session.",
    "bad_chunk": "A blob chunk came out of order, with a wrong size, or for a blob that does not exist.",
    "frame_too_large": "A frame is larger than the limit stated in the handshake.",
    "limit_exceeded": "A limit stated in the handshake would be exceeded (jobs, blobs, sessions).",
    "internal_error": "The server failed while handling the request; the connection stays usable.",
}
RETRYABLE = {"limit_exceeded", "internal_error"}


class ProtocolError(Exception):
    """A typed protocol error: becomes an `error` message `{code, message, retryable, details}`."""

    def __init__(self, code: str, message: str, *, details: dict[str, Any] | None = None,
                 retryable: bool | None = None, id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.retryable = code in RETRYABLE if retryable is None else retryable
        self.id = id

    def to_data(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable, "details": self.details}


# ------------------------------------------------------------------------------------------- text frames


def envelope(type: str, data: dict[str, Any] | None = None, *, id: Any = None, job: str | None = None,
             seq: int | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": type}
    if id is not None:
        msg["id"] = id
    if job is not None:
        msg["job"] = job
    if seq is not None:
        msg["seq"] = seq
    msg["data"] = data if data is not None else {}
    return msg


def dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def parse_text(text: str, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Decode and check one text frame's envelope; raises `ProtocolError` for anything malformed."""
    if max_bytes is not None and len(text) > max_bytes // 4 and len(text.encode("utf-8", "replace")) > max_bytes:
        raise ProtocolError("frame_too_large", f"Text frames may be at most {max_bytes} bytes.",
                            details={"limit": max_bytes})
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_frame", f"The text frame is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_frame", "A text frame must be a JSON object {v, type, id, job, seq, data}.")
    msg_id = message.get("id")
    if msg_id is not None and not _valid_id(msg_id):
        raise ProtocolError("bad_frame", f"`id` must be a string of at most {MAX_ID_LENGTH} characters or an "
                            "integer.")
    version = message.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError("unsupported_version", f"`v` must be {PROTOCOL_VERSION}, got {version!r}.",
                            id=msg_id, details={"supported": list(SUPPORTED_VERSIONS)})
    kind = message.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("bad_frame", "`type` must be a non-empty string.", id=msg_id)
    data = message.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("bad_frame", "`data` must be a JSON object.", id=msg_id)
    message["data"] = data
    job = message.get("job")
    if job is not None and not isinstance(job, str):
        raise ProtocolError("bad_frame", "`job` must be a string.", id=msg_id)
    return message


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**53) <= value <= 2**53
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


# ----------------------------------------------------------------------------------------- binary frames


def pack_binary(header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    head = dumps(header).encode("utf-8")
    if len(head) > MAX_BINARY_HEADER:
        raise ValueError("binary header too large")
    return b"".join((_HEAD.pack(BINARY_MAGIC, len(head)), head, payload))


def parse_binary(frame: bytes | bytearray | memoryview) -> tuple[dict[str, Any], memoryview]:
    """Split one binary frame into its JSON header and its payload; raises `ProtocolError` if malformed."""
    view = memoryview(frame)
    if len(view) < _HEAD.size:
        raise ProtocolError("bad_frame", "A binary frame needs at least 8 bytes: magic b'SDB1' and a header "
                            "length.")
    magic, length = _HEAD.unpack_from(view)
    if magic != BINARY_MAGIC:
        raise ProtocolError("bad_frame", f"Binary frames must start with {BINARY_MAGIC!r}, got {bytes(magic)!r}.")
    if not 2 <= length <= MAX_BINARY_HEADER or _HEAD.size + length > len(view):
        raise ProtocolError("bad_frame", f"Binary header length {length} is out of range (2..{MAX_BINARY_HEADER}"
                            f" and within the {len(view)}-byte frame).")
    try:
        header = json.loads(bytes(view[_HEAD.size:_HEAD.size + length]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("bad_frame", f"The binary header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_frame", "The binary header must be a JSON object.")
    return header, view[_HEAD.size + length:]


def blob_frames(blob: str, payload: bytes, *, mime: str, chunk_size: int,
                extra: dict[str, Any] | None = None) -> Iterator[tuple[dict[str, Any], memoryview]]:
    """The (header, payload chunk) pairs that carry `payload` as blob `blob` (at least one, even if empty)."""
    view = memoryview(payload)
    parts = max(1, -(-len(view) // chunk_size))
    for part in range(parts):
        header = {"type": "blob", "blob": blob, "part": part, "parts": parts, "size": len(view), "mime": mime}
        if extra:
            header.update(extra)
        yield header, view[part * chunk_size:(part + 1) * chunk_size]


@dataclass
class BlobAssembler:
    """Collects the chunks of incoming blobs, strictly in order, within size limits."""

    max_blob_bytes: int
    max_total_bytes: int
    max_blobs: int
    partial: dict[str, tuple[dict[str, Any], bytearray, int]] = field(default_factory=dict)  # blob -> header, buf, next
    complete: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # blob -> (mime, bytes)

    @property
    def held_bytes(self) -> int:
        return sum(len(b) for _, b in self.complete.values()) + sum(len(b) for _, b, _ in self.partial.values())

    def add(self, header: dict[str, Any], payload: memoryview) -> str | None:
        """Add one chunk; returns the blob id when the blob is complete. Raises `ProtocolError`."""
        blob, part, parts, size = header.get("blob"), header.get("part"), header.get("parts"), header.get("size")
        if not (isinstance(blob, str) and 0 < len(blob) <= MAX_ID_LENGTH):
            raise ProtocolError("bad_chunk", "A blob frame needs `blob`, a string id of at most "
                                f"{MAX_ID_LENGTH} characters.")
        ints = (part, parts, size)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ints) or parts < 1 or size < 0 \
                or not 0 <= part < parts:
            self.partial.pop(blob, None)
            raise ProtocolError("bad_chunk", "A blob frame needs integer `part` (0-based), `parts` >= 1 and "
                                "`size` >= 0 with part < parts.", details={"blob": blob})
        if size > self.max_blob_bytes:
            self.partial.pop(blob, None)
            raise ProtocolError("limit_exceeded", f"Blob {blob!r} is {size} bytes; the limit is "
                                f"{self.max_blob_bytes}.", details={"blob": blob, "limit": self.max_blob_bytes},
                                retryable=False)
        mime = header.get("mime", "application/octet-stream")
        if not isinstance(mime, str):
            raise ProtocolError("bad_chunk", "`mime` must be a string.", details={"blob": blob})
        if part == 0:
            if blob in self.complete:
                self.complete.pop(blob)  # re-uploading an id replaces it
            if blob in self.partial:
                self.partial.pop(blob)
            if len(self.complete) + len(self.partial) >= self.max_blobs:
                raise ProtocolError("limit_exceeded", f"A session may hold at most {self.max_blobs} blobs; "
                                    "release some or use them in a request.", details={"blob": blob},
                                    retryable=False)
            if self.held_bytes + size > self.max_total_bytes:
                raise ProtocolError("limit_exceeded", f"A session may hold at most {self.max_total_bytes} "
                                    "bytes of blobs.", details={"blob": blob}, retryable=False)
            state = ({"parts": parts, "size": size, "mime": mime}, bytearray(), 0)
        else:
            state = self.partial.get(blob)  # type: ignore[assignment]
            if state is None:
                raise ProtocolError("bad_chunk", f"Chunk {part} of blob {blob!r} came without chunk 0.",
                                    details={"blob": blob, "part": part})
        meta, buf, expected = state
        if part != expected or parts != meta["parts"] or size != meta["size"]:
            self.partial.pop(blob, None)
            raise ProtocolError("bad_chunk", f"Blob {blob!r}: expected chunk {expected} of {meta['parts']} "
                                f"({meta['size']} bytes), got chunk {part} of {parts} ({size} bytes); the "
                                "partial blob was dropped, send it again from chunk 0.",
                                details={"blob": blob, "part": part, "expected": expected})
        if len(buf) + len(payload) > size:
            self.partial.pop(blob, None)
            raise ProtocolError("bad_chunk", f"Blob {blob!r} has more bytes than its stated size {size}.",
                                details={"blob": blob})
        buf += payload
        if part + 1 < parts:
            self.partial[blob] = (meta, buf, part + 1)
            return None
        self.partial.pop(blob, None)
        if len(buf) != size:
            raise ProtocolError("bad_chunk", f"Blob {blob!r} ended with {len(buf)} bytes, not its stated {size}.",
                                details={"blob": blob})
        self.complete[blob] = (mime, bytes(buf))
        return blob

    def take(self, blob: str) -> tuple[str, bytes]:
        try:
            return self.complete.pop(blob)
        except KeyError:
            raise ProtocolError("unknown_blob", f"No complete blob {blob!r} is held by this session; upload "
                                "it (all chunks) before the request that uses it.",
                                details={"blob": blob}) from None

    def release(self, blob: str) -> bool:
        return self.complete.pop(blob, None) is not None or self.partial.pop(blob, None) is not None
