"""Reliability of the bridge under load and abuse: many clients, dropped connections, 1,000+ bad frames,
slow readers. Real server on loopback, real websocket clients, the real Engine on the tiny model."""

import asyncio
import json
import os
import random
import socket

import pytest
from sdcore_bridges import protocol as P
from sdcore_bridges.client import BridgeClient
from sdcore_bridges.testing import gate_for, serve_in_thread, shared_engine
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from sdcore.infotext import parse_infotext

REQ = dict(prompt="a red circle", steps=1, width=64, height=64, sampler="Euler")


def run(coro, timeout=90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def engine(tiny_sd1_model):
    return shared_engine(str(tiny_sd1_model))


@pytest.fixture(scope="module")
def gate(engine):
    g = gate_for(engine)
    g.open()
    yield g
    g.open()


@pytest.fixture(scope="module")
def server(engine, gate):
    with serve_in_thread(engine) as handle:
        yield handle


def test_fifty_concurrent_clients_each_get_exactly_their_result(server):
    n = 50

    async def one(i):
        c = BridgeClient(server.url, client_name=f"load-{i}")
        seen_jobs = set()
        c.on_event.append(lambda job, event: seen_jobs.add(event.job))
        await c.connect()
        job = await c.submit({**REQ, "seed": 1000 + i, "prompt": f"client {i}"})
        result = await job.result(80)
        await c.close()
        return i, job, result, seen_jobs, c.duplicates

    async def main():
        return await asyncio.gather(*(one(i) for i in range(n)))

    outcomes = run(main())
    job_ids = [job.id for _, job, _, _, _ in outcomes]
    assert len(set(job_ids)) == n
    for i, job, result, seen_jobs, duplicates in outcomes:
        assert seen_jobs == {job.id}, "a client saw another client's events"
        types = [e.type for e in job.history]
        assert types.count("result") == 1 and types[-1] == "result" and types[0] == "queued"
        assert duplicates == 0
        info = parse_infotext(result.images[0].infotext)
        assert info.prompt == f"client {i}" and info.params["Seed"] == str(1000 + i)
        assert result.images[0].data[:4] == b"\x89PNG"


def test_clients_that_drop_mid_job_get_their_results_after_resuming(server, gate):
    gate.close()

    async def main():
        clients = [BridgeClient(server.url, ping_interval=0.3) for _ in range(5)]
        for c in clients:
            await c.connect()
        jobs = [await c.submit({**REQ, "prompt": f"gate {i}", "seed": i}) for i, c in enumerate(clients)]
        await asyncio.to_thread(gate.wait_entered)
        for c in clients:
            await c.drop_connection()
        gate.open()
        results = [await j.result(60) for j in jobs]
        for i, (c, r) in enumerate(zip(clients, results, strict=True)):
            assert c.reconnects >= 1 and c.welcome["resumed"]
            assert r.images[0].seed == i
            assert [e.type for e in jobs[i].history].count("result") == 1
            await c.close()

    try:
        run(main())
    finally:
        gate.open()


def bad_frames(rng):
    """Yield (frame, expect_id) pairs: frames that must each get exactly one typed error."""
    job = "0" * 32
    texts = [
        "not json", "{", "[]", "null", "42", '"str"', '{"v":1}', '{"v":"1","type":"ping"}', '{"v":0,"type":"x"}',
        '{"type":"submit","id":"x"}', '{"v":1,"type":7,"id":"x"}', '{"v":1,"type":"submit","data":5,"id":"q"}',
        '{"v":1,"type":"frobnicate","id":"m"}', '{"v":1,"type":"submit"}', '{"v":1,"type":"cancel"}',
        '{"v":1,"type":"result","data":{}}', '{"v":1,"type":"hello","id":"h","data":{"protocol":[1]}}',
        '{"v":1,"type":"ping","id":[1]}', "\x00\x01\x02", '{"v":1,"type":"list_models","id":true}',
    ]
    for text in texts:
        yield text, None
    requests = [
        ("submit", {}), ("submit", {"request": "x"}), ("submit", {"request": [1]}),
        ("submit", {"request": {"steps": 0}}), ("submit", {"request": {"width": 65}}),
        ("submit", {"request": {"sampler": "Nope"}}), ("submit", {"request": {"prompt": 5}}),
        ("submit", {"request": {"init_image": "/etc/passwd"}}), ("submit", {"request": {"mask": {"blob": 5}}}),
        ("submit", {"request": {"init_image": {"blob": "missing"}}}), ("submit", {"request": {"model": "/x"}}),
        ("submit", {"request": {"options": {"nope": {}}}}), ("submit", {"request": {"mode": "inpaint"}}),
        ("cancel", {}), ("cancel", {"job": 5}), ("cancel", {"job": job}), ("replace", {"job": job}),
        ("replace", {"job": job, "request": {}}), ("subscribe", {"job": job}), ("unsubscribe", {"job": job}),
        ("job_status", {"job": None}), ("release", {}), ("submit", {"request": {"steps": "many"}}),
    ]
    for method, data in requests:
        yield {"method": method, "data": data}, True
    magic = P.BINARY_MAGIC
    blobs = [
        b"", b"SDB", b"XXXX\x00\x00\x00\x02{}", magic + b"\x00\x00\x00\x01{", magic + b"\xff\xff\xff\xff{}",
        magic + b"\x00\x00\x00\x05{abc}", magic + b"\x00\x00\x00\x02[]", P.pack_binary({"type": "preview"}, b""),
        P.pack_binary({"type": "blob"}, b""), P.pack_binary({"type": "blob", "blob": "b", "part": 1, "parts": 2,
                                                             "size": 4}, b"xx"),
        P.pack_binary({"type": "blob", "blob": "b", "part": 0, "parts": 1, "size": 2}, b"xxxx"),
        P.pack_binary({"type": "blob", "blob": "b", "part": 0, "parts": 1, "size": 10**12}, b""),
        P.pack_binary({"type": "blob", "blob": "b", "part": "0", "parts": 1, "size": 1}, b"x"),
    ]
    for frame in blobs:
        yield frame, None
    while True:  # random mutations of valid frames: truncated, bit-flipped, out of order
        kind = rng.randrange(4)
        if kind == 0:
            good = P.dumps(P.envelope("submit", {"request": {**REQ, "steps": 0}}, id=f"r{rng.randrange(10**6)}"))
            yield good[: rng.randrange(1, len(good))], None
        elif kind == 1:
            frame = bytearray(P.pack_binary({"type": "blob", "blob": "z", "part": 0, "parts": 2, "size": 10},
                                            b"12345"))
            frame[rng.randrange(4)] ^= 0xFF
            yield bytes(frame), None
        elif kind == 2:
            yield P.pack_binary({"type": "blob", "blob": f"o{rng.randrange(99)}", "part": rng.randrange(1, 5),
                                 "parts": 5, "size": 50}, b"0123456789"), None
        else:
            yield {"method": rng.choice(["cancel", "job_status", "subscribe"]),
                   "data": {"job": f"{rng.randrange(10**9):032x}"}}, True


async def abuse(url, count, seed):
    """Send `count` bad frames on one connection, one at a time; each must get one typed error."""
    rng = random.Random(seed)
    ws = await connect(url, max_size=2**25)
    await ws.send(P.dumps(P.envelope("hello", {"protocol": [1]})))
    assert json.loads(await ws.recv())["type"] == "welcome"
    codes = []
    frames = bad_frames(rng)
    for n in range(count):
        frame, has_id = next(frames)
        if isinstance(frame, dict):
            frame = P.dumps(P.envelope(frame["method"], frame["data"], id=f"bad{n}"))
        await ws.send(frame)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
        assert reply["type"] == "error", (frame[:80], reply)
        assert reply["data"]["code"] in P.ERROR_CODES and reply["data"]["message"]
        if has_id:
            assert reply["id"] == f"bad{n}"
        codes.append(reply["data"]["code"])
    # oversized frames: above the protocol limit a typed error; above the transport limit the connection
    big = P.dumps(P.envelope("submit", {"request": {"prompt": "x" * (P.DEFAULT_LIMITS["max_text_frame"] + 10)}},
                             id="big"))
    await ws.send(big)
    reply = json.loads(await ws.recv())
    assert reply["data"]["code"] == "frame_too_large"
    await ws.send(b"SDB1" + b"\x00" * (P.DEFAULT_LIMITS["max_binary_frame"] + 10))
    assert json.loads(await ws.recv())["data"]["code"] == "frame_too_large"
    await ws.send(P.dumps(P.envelope("list_models", id="still-alive")))  # the connection still works
    alive = json.loads(await ws.recv())
    assert alive["type"] == "reply" and alive["id"] == "still-alive"
    codes += ["frame_too_large", "frame_too_large"]
    try:
        await ws.send(b"x" * (P.DEFAULT_LIMITS["transport_max_frame"] + 1))
        await asyncio.wait_for(ws.recv(), 20)
    except ConnectionClosed:
        pass
    assert ws.close_code == 1009  # message too big: the websocket layer ends this one connection
    return codes


def test_a_thousand_bad_frames_get_typed_errors_and_good_clients_are_served(server):
    async def good_client(n):
        async with BridgeClient(server.url) as c:
            results = []
            for i in range(n):
                results.append(await c.generate({**REQ, "seed": 7 + i}, timeout=60))
            return results

    async def main():
        return await asyncio.gather(*(abuse(server.url, 260, seed) for seed in range(4)), good_client(4))

    *codes, good = run(main())
    all_codes = [c for cs in codes for c in cs]
    assert len(all_codes) >= 1000
    assert len(good) == 4 and all(r.images[0].data for r in good)
    expected = {"bad_frame", "unsupported_version", "unknown_method", "unknown_type", "invalid_params",
                "invalid_request", "unknown_job", "unknown_blob", "bad_chunk", "already_hello", "frame_too_large",
                "limit_exceeded"}
    assert expected <= set(all_codes), expected - set(all_codes)

    async def after():
        async with BridgeClient(server.url) as c:
            return await c.generate({**REQ, "seed": 99})

    assert run(after()).images[0].seed == 99


def test_a_slow_reader_is_cut_off_without_delaying_others(engine):
    limits = {"replay_bytes": 512 * 1024, "replay_frames": 100_000}
    with serve_in_thread(engine, limits=limits) as srv:
        async def main():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, like a slow link
            sock.connect(("127.0.0.1", srv.server.port))
            sock.setblocking(False)
            slow = await connect(srv.url, sock=sock, max_queue=1, max_size=2**25)
            await slow.send(P.dumps(P.envelope("hello", {"protocol": [1]})))
            await slow.recv()
            slow.transport.pause_reading()  # stop reading entirely
            for n in range(600):  # each reply is a ~5 kB JSON schema: megabytes the slow client never reads
                await slow.send(P.dumps(P.envelope("get_schema", id=n)))
            async with BridgeClient(srv.url) as fast:
                latencies = [await fast.ping() for _ in range(20)]
                result = await fast.generate({**REQ, "seed": 3}, timeout=60)
            slow.transport.resume_reading()
            try:
                while True:
                    await asyncio.wait_for(slow.recv(), 20)
            except ConnectionClosed:
                pass
            return latencies, result, slow.close_code

        latencies, result, close_code = run(main())
        assert max(latencies) < 1.0 and result.images[0].seed == 3
        assert close_code == P.CLOSE_TOO_SLOW


@pytest.mark.skipif(os.environ.get("SDCORE_BRIDGE_SOAK") is None, reason="set SDCORE_BRIDGE_SOAK=1 for a longer run")
def test_soak_many_rounds(server):
    async def main():
        for _ in range(20):
            async with BridgeClient(server.url) as c:
                jobs = [await c.submit({**REQ, "seed": i}) for i in range(5)]
                await jobs[2].cancel()
                for j in jobs:
                    await j.wait(60)

    run(main(), timeout=600)
