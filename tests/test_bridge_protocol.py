"""Bridge protocol v1 without a server: framing, chunking, the fair queue, schemas and their documentation."""

import json
import re
from pathlib import Path

import pytest
from sdcore_bridges import protocol as P
from sdcore_bridges import schemas as S
from sdcore_bridges.protocol import BlobAssembler, ProtocolError
from sdcore_bridges.server import BridgeConfigError, BridgeJob, BridgeServer, FairQueue, is_loopback

DOC = Path(__file__).parents[1] / "docs" / "bridge-protocol.md"


def code_of(fn, *args, **kwargs):
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    assert info.value.code in P.ERROR_CODES
    return info.value.code


def test_text_envelope_round_trip():
    msg = P.envelope("submit", {"request": {"prompt": "x"}}, id="c1")
    parsed = P.parse_text(P.dumps(msg))
    assert parsed == {"v": 1, "type": "submit", "id": "c1", "data": {"request": {"prompt": "x"}}}
    assert P.parse_text('{"v":1,"type":"ping"}')["data"] == {}


@pytest.mark.parametrize("text,code", [
    ("not json", "bad_frame"),
    ("[1,2]", "bad_frame"),
    ('"hello"', "bad_frame"),
    ('{"type":"ping"}', "unsupported_version"),
    ('{"v":2,"type":"ping"}', "unsupported_version"),
    ('{"v":true,"type":"ping"}', "unsupported_version"),
    ('{"v":1}', "bad_frame"),
    ('{"v":1,"type":""}', "bad_frame"),
    ('{"v":1,"type":5}', "bad_frame"),
    ('{"v":1,"type":"ping","data":[]}', "bad_frame"),
    ('{"v":1,"type":"ping","id":{"a":1}}', "bad_frame"),
    ('{"v":1,"type":"ping","id":"' + "x" * 200 + '"}', "bad_frame"),
    ('{"v":1,"type":"ping","job":7}', "bad_frame"),
    ("[" * 100000 + "]" * 100000, "bad_frame"),
])
def test_malformed_text_frames_get_typed_errors(text, code):
    assert code_of(P.parse_text, text) == code


def test_text_frame_limit():
    assert code_of(P.parse_text, '{"v":1,"type":"x","data":{"a":"' + "é" * 600 + '"}}', max_bytes=1000) \
        == "frame_too_large"


def test_binary_frame_round_trip_and_errors():
    frame = P.pack_binary({"type": "blob", "blob": "b1"}, b"payload")
    assert frame[:4] == b"SDB1"
    header, payload = P.parse_binary(frame)
    assert header == {"type": "blob", "blob": "b1"} and bytes(payload) == b"payload"
    assert code_of(P.parse_binary, b"SDB") == "bad_frame"
    assert code_of(P.parse_binary, b"XXXX" + frame[4:]) == "bad_frame"
    assert code_of(P.parse_binary, frame[:4] + (10**6).to_bytes(4, "big") + frame[8:]) == "bad_frame"
    assert code_of(P.parse_binary, frame[:4] + (3).to_bytes(4, "big") + b"{{{") == "bad_frame"
    assert code_of(P.parse_binary, frame[:4] + (2).to_bytes(4, "big") + b"[]") == "bad_frame"
    assert code_of(P.parse_binary, frame[:4] + (2).to_bytes(4, "big") + b"\xff\xfe") == "bad_frame"


def assembler(**kw):
    return BlobAssembler(kw.get("max_blob", 10_000), kw.get("max_total", 20_000), kw.get("max_blobs", 4))


def test_chunked_blobs_reassemble_in_order():
    data = bytes(range(256)) * 30
    a = assembler()
    done = [a.add(h, p) for h, p in P.blob_frames("b", data, mime="image/png", chunk_size=1000)]
    assert done == [None] * 7 + ["b"]
    assert a.take("b") == ("image/png", data)
    assert code_of(a.take, "b") == "unknown_blob"
    empty = list(P.blob_frames("e", b"", mime="x", chunk_size=10))
    assert len(empty) == 1 and a.add(*empty[0]) == "e"


def test_chunk_errors():
    data = b"x" * 3000
    frames = list(P.blob_frames("b", data, mime="image/png", chunk_size=1000))
    a = assembler()
    assert code_of(a.add, *frames[1]) == "bad_chunk"  # no chunk 0
    a.add(*frames[0])
    assert code_of(a.add, *frames[2]) == "bad_chunk"  # skipped chunk 1; the partial blob is dropped
    assert code_of(a.add, *frames[1]) == "bad_chunk"
    big = list(P.blob_frames("big", b"x" * 20_000, mime="x", chunk_size=5000))
    assert code_of(a.add, *big[0]) == "limit_exceeded"
    header, payload = frames[0]
    assert code_of(a.add, {**header, "part": -1}, payload) == "bad_chunk"
    assert code_of(a.add, {**header, "parts": "3"}, payload) == "bad_chunk"
    assert code_of(a.add, {**header, "blob": ""}, payload) == "bad_chunk"
    assert code_of(a.add, {**header, "size": 10, "parts": 1}, payload) == "bad_chunk"  # more bytes than size
    assert code_of(a.add, {**header, "size": 2000, "parts": 1}, payload) == "bad_chunk"  # fewer bytes
    full = assembler(max_blobs=1)
    full.add(*list(P.blob_frames("one", b"1", mime="x", chunk_size=10))[0])
    assert code_of(full.add, *list(P.blob_frames("two", b"2", mime="x", chunk_size=10))[0]) == "limit_exceeded"
    assert full.release("one") and not full.release("one")


def job(owner, n):
    return BridgeJob(id=f"{owner}{n}", owner=owner, session_id=owner, raw_request={}, request_summary={})


def test_fair_queue_round_robin_and_positions():
    q = FairQueue()
    jobs = [job("a", 1), job("a", 2), job("a", 3), job("b", 1), job("c", 1), job("c", 2)]
    for j in jobs:
        q.push(j)
    positions = {j.id: q.position(j) for j in jobs}
    order = []
    while (j := q.pop()) is not None:
        order.append(j.id)
    assert order == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert [positions[i] for i in order] == list(range(6))


def test_fair_queue_remove_and_replace():
    q = FairQueue()
    a1, a2, b1 = job("a", 1), job("a", 2), job("b", 1)
    for j in (a1, a2, b1):
        q.push(j)
    new = job("a", 9)
    assert q.replace(a2, new) and new in q and a2 not in q
    assert not q.replace(b1, job("a", 8))  # another owner's job is never replaced
    assert q.remove(a1) and not q.remove(a1)
    assert [q.pop().id, q.pop().id, q.pop()] == ["a9", "b1", None]


def test_public_bind_without_token_is_refused():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    with pytest.raises(BridgeConfigError, match="without a token"):
        BridgeServer(None, host="0.0.0.0")
    with pytest.raises(BridgeConfigError, match="empty"):
        BridgeServer(None, host="0.0.0.0", token="")


def test_schemas_are_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    for group in (S.CLIENT_MESSAGES, S.SERVER_MESSAGES, S.REPLY_DATA, S.BINARY_HEADERS):
        for schema in group.values():
            jsonschema.Draft202012Validator.check_schema(schema)
    assert set(S.CLIENT_MESSAGES) >= set(P.METHODS) | set(P.CLIENT_NOTICES)
    assert set(S.REPLY_DATA) == set(P.METHODS)


def _doc_schemas():
    text = DOC.read_text(encoding="utf-8")
    found = {}
    for match in re.finditer(r"<!-- schema: (\S+) -->\s*```json\n(.*?)```", text, re.S):
        found[match.group(1)] = json.loads(match.group(2))
    return text, found


def test_every_message_schema_is_documented_verbatim():
    text, found = _doc_schemas()
    expected = {}
    for prefix, group in (("client", S.CLIENT_MESSAGES), ("server", S.SERVER_MESSAGES),
                          ("reply", S.REPLY_DATA), ("binary", S.BINARY_HEADERS)):
        for name, schema in group.items():
            expected[f"{prefix}.{name}"] = schema
    missing = sorted(set(expected) - set(found))
    assert not missing, f"docs/bridge-protocol.md lacks the schemas of {missing}"
    stale = [k for k in expected if found[k] != expected[k]]
    assert not stale, f"docs/bridge-protocol.md has outdated schemas for {stale}; regenerate with " \
                      "`python -m sdcore_bridges.docgen`"
    for code in P.ERROR_CODES:
        assert f"`{code}`" in text, f"error code {code} is not documented"
    for method in P.METHODS:
        assert f"`{method}`" in text
