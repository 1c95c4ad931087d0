"""JSON schemas (draft 2020-12) of every message of bridge protocol v1.

`docs/bridge-protocol.md` shows each of these schemas verbatim (a test checks that they agree), and the tests
validate every frame the server sends against them.

- `CLIENT_MESSAGES[type]`: text frames a client sends;
- `SERVER_MESSAGES[type]`: text frames the server sends;
- `REPLY_DATA[method]`: the `data` of the `reply` to each built-in method;
- `BINARY_HEADERS[name]`: the JSON headers of binary frames.
"""

from __future__ import annotations

from typing import Any

ID = {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 128}, {"type": "integer"}]}
JOB_ID = {"type": "string", "minLength": 1, "maxLength": 128}
SEQ = {"type": "integer", "minimum": 1}
T = {"type": "number", "description": "Server wall-clock time of the event, seconds since the epoch."}
ERROR_DATA = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "retryable": {"type": "boolean"},
        "details": {"type": "object"},
        "type": {"type": "string"},
        "t": T,
    },
}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), extra: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if not extra:
        schema["additionalProperties"] = False
    return schema


def message(type: str, data: dict[str, Any], *, id: str = "no", job: str = "no", seq: str = "no") -> dict[str, Any]:
    """An envelope schema; `id`/`job`/`seq` are "required", "optional" or "no"."""
    properties: dict[str, Any] = {"v": {"const": 1}, "type": {"const": type}, "data": data}
    required = ["v", "type", "data"]
    for name, mode, schema in (("id", id, ID), ("job", job, JOB_ID), ("seq", seq, SEQ)):
        if mode != "no":
            properties[name] = schema
        if mode == "required":
            required.append(name)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": type, "type": "object",
            "properties": properties, "required": required, "additionalProperties": False}


_REQUEST = {"type": "object", "description": "A GenerationRequest (see get_schema); images as {\"blob\": id} or "
            "data: URLs."}
_JOB_ONLY = _obj({"job": JOB_ID}, ("job",))
_EMPTY = {"type": "object"}

CLIENT_MESSAGES: dict[str, dict[str, Any]] = {
    "hello": message("hello", _obj({
        "protocol": {"oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}, "minItems": 1}]},
        "token": {"type": ["string", "null"]},
        "client": {"type": "string"},
        "client_version": {"type": "string"},
        "session": {"type": ["string", "null"], "description": "Resume this session."},
        "last_seq": {"type": "integer", "minimum": 0, "description": "Highest seq received on that session."},
        "previews": {"oneOf": [{"type": "boolean"}, _obj({
            "enabled": {"type": "boolean"}, "interval_ms": {"type": "number", "minimum": 20},
            "max_size": {"type": "integer", "minimum": 32, "maximum": 1024}})]},
    }, ("protocol",)), id="optional"),
    "ping": message("ping", _obj({"t": {"type": "number"}, "ack": {"type": "integer"}}), id="optional"),
    "pong": message("pong", _obj({"t": {"type": ["number", "null"]}, "ack": {"type": "integer"}})),
    "ack": message("ack", _obj({"seq": {"type": "integer"}}, ("seq",))),
    "submit": message("submit", _obj({"request": _REQUEST}, ("request",)), id="required"),
    "cancel": message("cancel", _JOB_ONLY, id="required"),
    "replace": message("replace", _obj({"job": JOB_ID, "request": _REQUEST, "cancel_running": {"type": "boolean"}},
                                       ("job", "request")), id="required"),
    "subscribe": message("subscribe", _JOB_ONLY, id="required"),
    "unsubscribe": message("unsubscribe", _JOB_ONLY, id="required"),
    "job_status": message("job_status", _JOB_ONLY, id="required"),
    "list_jobs": message("list_jobs", _EMPTY, id="required"),
    "list_models": message("list_models", _EMPTY, id="required"),
    "list_samplers": message("list_samplers", _EMPTY, id="required"),
    "list_loras": message("list_loras", _EMPTY, id="required"),
    "list_embeddings": message("list_embeddings", _EMPTY, id="required"),
    "get_schema": message("get_schema", _EMPTY, id="required"),
    "engine_info": message("engine_info", _EMPTY, id="required"),
    "release": message("release", _obj({"blob": {"type": "string"}}, ("blob",)), id="required"),
    "bye": message("bye", _EMPTY, id="required"),
}

_STATUS = _obj({"job": JOB_ID, "state": {"enum": ["queued", "dispatching", "running", "done", "failed",
                                                   "cancelled"]},
                "step": {"type": "integer"}, "total": {"type": "integer"}, "created": {"type": "number"},
                "finished": {"type": ["number", "null"]}, "position": {"type": "integer"}},
               ("job", "state", "step", "total"))
_IMAGE = _obj({"index": {"type": "integer"}, "blob": {"type": "string"}, "mime": {"const": "image/png"},
               "size": {"type": "integer"}, "width": {"type": "integer"}, "height": {"type": "integer"},
               "seed": {"type": "integer"}, "subseed": {"type": "integer"}, "infotext": {"type": "string"}},
              ("index", "blob", "mime", "size", "width", "height", "seed", "infotext"))
_ITEMS = _obj({"items": {"type": "array"}}, ("items",))

SERVER_MESSAGES: dict[str, dict[str, Any]] = {
    "welcome": message("welcome", _obj({
        "protocol": {"const": 1}, "server": {"type": "string"}, "server_version": {"type": "string"},
        "session": {"type": "string"}, "resumed": {"type": "boolean"}, "gap": {"type": "boolean"},
        "last_seq": {"type": "integer"}, "reason": {"type": "string"},
        "capabilities": _obj({"methods": {"type": "array", "items": {"type": "string"}},
                              "events": {"type": "array", "items": {"type": "string"}},
                              "image_formats": {"type": "array"}, "previews": {"type": "boolean"},
                              "auth": {"type": "boolean"}}, ("methods", "events")),
        "limits": {"type": "object", "additionalProperties": {"type": "integer"}},
        "engine": {"type": "object"},
        "models": {"type": "array", "items": _obj({"name": {"type": "string"}, "path": {"type": "string"},
                                                   "default": {"type": "boolean"}}, ("name",))},
    }, ("protocol", "server", "server_version", "session", "resumed", "last_seq", "capabilities", "limits",
        "engine", "models"))),
    "reply": message("reply", {"type": "object"}, id="required", seq="required"),
    "error": message("error", ERROR_DATA, id="optional", job="optional", seq="optional"),
    "ping": message("ping", _obj({"t": {"type": "number"}}, ("t",))),
    "pong": message("pong", _obj({"t": {}, "server_t": {"type": "number"}, "last_seq": {"type": "integer"}}),
                    id="optional"),
    "queued": message("queued", _obj({"position": {"type": "integer", "minimum": 0}, "t": T}, ("position",)),
                      job="required", seq="required"),
    "started": message("started", _obj({"t": T}), job="required", seq="required"),
    "progress": message("progress", _obj({"step": {"type": "integer"}, "total": {"type": "integer"},
                                          "batch": {"type": "integer"}, "fraction": {"type": "number"}, "t": T},
                                         ("step", "total")), job="required", seq="required"),
    "result": message("result", _obj({"images": {"type": "array", "items": _IMAGE},
                                      "seeds": {"type": "array", "items": {"type": "integer"}},
                                      "infotexts": {"type": "array", "items": {"type": "string"}},
                                      "model": {"type": "string"}, "model_hash": {"type": ["string", "null"]},
                                      "request": {"type": "object"}, "t": T}, ("images", "seeds", "infotexts")),
                      job="required", seq="required"),
    "cancelled": message("cancelled", _obj({"replaced_by": JOB_ID, "t": T}), job="required", seq="required"),
    "job_status": message("job_status", _STATUS, job="required", seq="required"),
}
# the job's terminal error event is an `error` with `job` and without `id`; see SERVER_MESSAGES["error"]

REPLY_DATA: dict[str, dict[str, Any]] = {
    "submit": _obj({"job": JOB_ID, "position": {"type": "integer"}}, ("job", "position")),
    "replace": _obj({"job": JOB_ID, "replaced": {"type": ["string", "null"]}, "position": {"type": "integer"}},
                    ("job", "replaced", "position")),
    "cancel": _obj({"job": JOB_ID, "accepted": {"type": "boolean"}, "state": {"type": "string"}},
                   ("job", "accepted", "state")),
    "subscribe": _STATUS,
    "unsubscribe": _JOB_ONLY,
    "job_status": _STATUS,
    "list_jobs": _ITEMS,
    "list_models": _ITEMS,
    "list_samplers": _ITEMS,
    "list_loras": _ITEMS,
    "list_embeddings": _ITEMS,
    "get_schema": _obj({"schema": {"type": "object"}}, ("schema",)),
    "engine_info": {"type": "object"},
    "release": _obj({"blob": {"type": "string"}, "released": {"type": "boolean"}}, ("blob", "released")),
    "bye": _obj({"session": {"type": "string"}}, ("session",)),
}

BINARY_HEADERS: dict[str, dict[str, Any]] = {
    "blob": _obj({"type": {"const": "blob"}, "blob": {"type": "string", "minLength": 1, "maxLength": 128},
                  "part": {"type": "integer", "minimum": 0}, "parts": {"type": "integer", "minimum": 1},
                  "size": {"type": "integer", "minimum": 0}, "mime": {"type": "string"},
                  "job": JOB_ID, "seq": SEQ}, ("type", "blob", "part", "parts", "size")),
    "preview": _obj({"type": {"const": "preview"}, "job": JOB_ID, "step": {"type": "integer"},
                     "mime": {"const": "image/jpeg"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                     "t": T}, ("type", "job", "step", "mime")),
}


def server_schema_for(message: dict[str, Any]) -> dict[str, Any] | None:
    return SERVER_MESSAGES.get(str(message.get("type")))
