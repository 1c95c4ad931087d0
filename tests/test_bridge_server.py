"""The bridge server on loopback with real websocket clients and the real Engine on the tiny SD 1.x model."""

import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image
from sdcore_bridges import protocol as P
from sdcore_bridges import schemas as S
from sdcore_bridges.client import BridgeClient, BridgeError, JobCancelledError
from sdcore_bridges.server import BridgeServer
from sdcore_bridges.testing import gate_for, serve_in_thread, shared_engine
from websockets.asyncio.client import connect

from sdcore import hookimpl
from sdcore.errors import PluginError
from sdcore.infotext import read_infotext

REQ = dict(prompt="a red circle", steps=1, width=64, height=64, sampler="Euler", seed=1)
jsonschema = pytest.importorskip("jsonschema")


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def check_frame(msg):
    """Every frame the server sends must match its documented schema."""
    if "binary" in msg:
        jsonschema.validate(msg["binary"], S.BINARY_HEADERS[msg["binary"]["type"]])
        return
    schema = S.SERVER_MESSAGES.get(msg.get("type"))
    assert schema is not None, f"undocumented message type {msg.get('type')}"
    jsonschema.validate(msg, schema)


def client(url, **kw):
    c = BridgeClient(url, **kw)
    c.trace = check_frame
    return c


async def call(c, method, data=None):
    reply = await c.request(method, data)
    jsonschema.validate(reply, S.REPLY_DATA[method])
    return reply


@pytest.fixture(scope="module")
def engine(tiny_sd1_model):
    return shared_engine(str(tiny_sd1_model))


@pytest.fixture(scope="module")
def gate(engine):
    g = gate_for(engine)
    yield g
    g.open()


@pytest.fixture(scope="module")
def server(engine, gate):
    with serve_in_thread(engine) as handle:
        yield handle


@pytest.fixture
def closed_gate(gate):
    gate.close()
    yield gate
    gate.open()


async def raw_hello(url, hello=None, **kw):
    ws = await connect(url, **kw)
    await ws.send(json.dumps({"v": 1, "type": "hello", "data": hello or {"protocol": [1]}}))
    return ws, json.loads(await ws.recv())


# -- handshake, auth ------------------------------------------------------------------------------------


def test_welcome_states_version_capabilities_limits_engine_and_models(server, tiny_sd1_model):
    async def main():
        async with client(server.url) as c:
            w = c.welcome
            assert w["protocol"] == 1 and w["resumed"] is False and w["session"]
            assert {"submit", "cancel", "replace", "list_loras", "list_embeddings", "get_schema"} <= set(
                w["capabilities"]["methods"])
            assert w["limits"]["max_text_frame"] == P.DEFAULT_LIMITS["max_text_frame"]
            assert w["engine"]["device"] == "cpu" and "Euler" in w["engine"]["samplers"]
            assert w["models"][0]["path"] == str(tiny_sd1_model) and w["models"][0]["default"]

    run(main())


def test_incompatible_client_is_refused_at_connect_time(server):
    async def main():
        ws, msg = await raw_hello(server.url, {"protocol": [2, 3], "client": "future"})
        check_frame(msg)
        assert msg["type"] == "error" and msg["data"]["code"] == "incompatible_protocol"
        assert msg["data"]["details"]["supported"] == [1] and "protocol 1" in msg["data"]["message"]
        await ws.wait_closed()
        assert ws.close_code == P.CLOSE_INCOMPATIBLE
        ws = await connect(server.url)
        await ws.send(json.dumps({"v": 2, "type": "hello", "data": {"protocol": 2}}))
        msg = json.loads(await ws.recv())
        assert msg["data"]["code"] == "incompatible_protocol"
        await ws.wait_closed()
        assert ws.close_code == P.CLOSE_INCOMPATIBLE
        with pytest.raises(BridgeError) as info:
            await BridgeClient(server.url, protocol_versions=[7]).connect()
        assert info.value.code == "incompatible_protocol"

    run(main())


def test_first_frame_must_be_hello(server):
    async def main():
        for first in ('{"v":1,"type":"list_models","id":1}', b"SDB1\x00\x00\x00\x02{}", "garbage"):
            ws = await connect(server.url)
            await ws.send(first)
            msg = json.loads(await ws.recv())
            assert msg["data"]["code"] == "hello_required"
            await ws.wait_closed()
            assert ws.close_code == P.CLOSE_HELLO_REQUIRED

    run(main())


def test_token_required_and_compared(engine):
    with serve_in_thread(engine, token="s3cret") as srv:
        async def main():
            for hello in ({"protocol": [1]}, {"protocol": [1], "token": "wrong"}, {"protocol": [1], "token": 5}):
                ws, msg = await raw_hello(srv.url, hello)
                assert msg["type"] == "error" and msg["data"]["code"] == "unauthorized"
                await ws.wait_closed()  # and nothing else is served
                assert ws.close_code == P.CLOSE_UNAUTHORIZED
            async with client(srv.url, token="s3cret") as c:
                assert c.welcome["capabilities"]["auth"] is True
                assert await c.list_models()

        run(main())


def test_wrong_origin_gets_nothing(engine):
    with serve_in_thread(engine, allowed_origins=["https://editor.example"]) as srv:
        async def main():
            with pytest.raises(BridgeError) as info:
                await BridgeClient(srv.url, origin="https://evil.example").connect()
            assert info.value.code == "forbidden"
            async with client(srv.url, origin="https://editor.example") as c:
                assert await c.list_models()
            async with client(srv.url) as c:  # native clients send no Origin
                assert await c.list_models()

        run(main())


# -- generation -----------------------------------------------------------------------------------------


def test_txt2img_events_and_lossless_png_with_infotext(server, engine):
    async def main():
        async with client(server.url) as c:
            job = await c.submit({**REQ, "steps": 2, "seed": 42})
            types = [e.type async for e in job.events()]
            result = await job.result()
            return types, result

    types, result = run(main())
    assert types == ["queued", "started", "progress", "progress", "result"]
    image = result.images[0]
    assert image.seed == 42 and image.width == 64 and image.mime == "image/png"
    assert read_infotext(image.data) == image.infotext and "Seed: 42" in image.infotext
    direct = engine.generate({**REQ, "steps": 2, "seed": 42}).images[0]
    assert np.array_equal(np.asarray(image.image().convert("RGB")), np.asarray(direct.convert("RGB")))
    assert result.data["request"]["seed"] == 42 and result.data["model"] == "tiny-sd15"


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_img2img_and_inpaint_with_binary_blobs(server):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    async def main():
        async with client(server.url) as c:
            img2img = await c.generate({**REQ, "denoising_strength": 0.5}, images={"init_image": png(init)})
            inpaint = await c.generate({**REQ, "mask_blur": 0}, images={"init_image": init, "mask": png(mask)})
            return img2img, inpaint

    img2img, inpaint = run(main())
    assert img2img.data["request"]["mode"] == "img2img" and img2img.images[0].width == 64
    assert inpaint.data["request"]["mode"] == "inpaint"
    out = np.asarray(inpaint.images[0].image().convert("RGB")).astype(int)
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(init).astype(int)[keep])  # outside the mask: untouched
    assert not np.array_equal(out[~keep], np.asarray(init).astype(int)[~keep])


def test_bad_requests_are_refused_before_queueing(server, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64)).save(secret)

    async def main():
        async with client(server.url) as c:
            codes = {}
            for name, req in {
                "steps": {**REQ, "steps": 0}, "width": {**REQ, "width": 63}, "sampler": {**REQ, "sampler": "Nope"},
                "unknown": {**REQ, "colour": "red"}, "path": {**REQ, "init_image": str(secret)},
                "model": {**REQ, "model": "/etc/passwd"}, "vae": {**REQ, "vae": "/tmp/x.safetensors"},
                "blob": {**REQ, "init_image": {"blob": "never-sent"}},
                "notimage": {**REQ, "init_image": b"not an image at all"},
            }.items():
                with pytest.raises(BridgeError) as info:
                    await c.submit(req)
                codes[name] = info.value.code
            assert await c.request("list_jobs") == {"items": []}
            return codes

    codes = run(main())
    assert codes == {**{k: "invalid_request" for k in codes}, "blob": "unknown_blob"}


def test_job_failure_is_a_terminal_error_event(server, gate):
    async def main():
        async with client(server.url) as c:
            job = await c.submit({**REQ, "prompt": "fail please"})
            with pytest.raises(BridgeError) as info:
                await job.result(30)
            assert info.value.code == "internal_error" and "deliberate" in info.value.message
            assert (await c.generate(REQ)).images  # the server goes on

    run(main())


def test_cancel_queued_and_running_jobs(server, closed_gate):
    async def main():
        async with client(server.url) as c:
            running = await c.submit({**REQ, "prompt": "gate running"})
            queued = await c.submit(REQ)
            await asyncio.to_thread(closed_gate.wait_entered)
            reply = await call(c, "cancel", {"job": queued.id})
            assert reply == {"job": queued.id, "accepted": True, "state": "queued"}
            assert (await queued.wait(10)).type == "cancelled"
            reply = await call(c, "cancel", {"job": running.id})
            assert reply["accepted"] and reply["state"] == "running"
            closed_gate.open()
            with pytest.raises(JobCancelledError):
                await running.result(30)
            again = await call(c, "cancel", {"job": running.id})
            assert again["accepted"] is False and again["state"] == "cancelled"
            with pytest.raises(BridgeError) as info:
                await c.cancel("f" * 32)
            assert info.value.code == "unknown_job"

    run(main())


def test_replace_a_queued_job(server, closed_gate):
    async def main():
        async with client(server.url) as c:
            blocker = await c.submit({**REQ, "prompt": "gate blocker"})
            await asyncio.to_thread(closed_gate.wait_entered)
            first = await c.submit({**REQ, "seed": 1})
            second = await c.replace(first, {**REQ, "seed": 2})
            assert (await first.wait(10)).data["replaced_by"] == second.id
            extra = await call(c, "replace", {"job": blocker.id, "request": REQ})
            assert extra["replaced"] is None  # a running job is not replaced: the request is queued as well
            closed_gate.open()
            result = await second.result(30)
            assert result.images[0].seed == 2
            await blocker.wait(30)
            await c.jobs[extra["job"]].wait(30)
            assert [e.type for e in first.history] == ["queued", "cancelled"]

    run(main())


def test_lists_schema_and_engine_info(server):
    async def main():
        async with client(server.url) as c:
            models = (await call(c, "list_models"))["items"]
            samplers = (await call(c, "list_samplers"))["items"]
            loras = (await call(c, "list_loras"))["items"]
            embeddings = (await call(c, "list_embeddings"))["items"]
            schema = (await call(c, "get_schema"))["schema"]
            info = await call(c, "engine_info")
            return models, samplers, loras, embeddings, schema, info

    models, samplers, loras, embeddings, schema, info = run(main())
    assert models[0]["name"] == "tiny-sd15"
    assert "Euler a" in [s["name"] for s in samplers]
    assert loras == [] and embeddings == []
    assert schema["properties"]["init_image"]["anyOf"][0]["required"] == ["blob"]
    assert "steps" in schema["properties"] and "options" in schema["properties"]
    assert info["device"] == "cpu"


class LoraLister:
    """A plugin adding protocol methods through the register_bridge_methods hook."""

    @hookimpl
    def register_bridge_methods(self, register):
        register("list_loras", lambda data, ctx: {"items": [{"name": "ink", "path": "ink.safetensors"}]})

        async def shout(data, ctx):
            return {"text": str(data.get("text", "")).upper(), "session": ctx.session_id is not None}

        register("demo.shout", shout)
        register("demo.fail", lambda data, ctx: 1 / 0)


def test_register_bridge_methods_hook(tiny_sd1_model):
    from sdcore import Engine

    engine = Engine(device="cpu", default_model=tiny_sd1_model, plugins=[LoraLister()], load_entrypoints=False)
    try:
        with serve_in_thread(engine) as srv:
            async def main():
                async with client(srv.url) as c:
                    assert "demo.shout" in c.welcome["capabilities"]["methods"]
                    assert await c.list_loras() == [{"name": "ink", "path": "ink.safetensors"}]
                    assert await c.request("demo.shout", {"text": "hi"}) == {"text": "HI", "session": True}
                    with pytest.raises(BridgeError) as info:
                        await c.request("demo.fail")
                    assert info.value.code == "internal_error"
                    with pytest.raises(BridgeError) as info:
                        await c.request("demo.missing")
                    assert info.value.code == "unknown_method"

            run(main())

        class Clash:
            @hookimpl
            def register_bridge_methods(self, register):
                register("submit", lambda data, ctx: {})

        engine.register(Clash())
        with pytest.raises(PluginError, match="registered twice"):
            BridgeServer(engine, port=0)
    finally:
        engine.close()


def test_previews_are_opt_in_throttled_and_latest_only(server):
    async def main():
        async with client(server.url, previews=True, preview_interval_ms=150) as c:
            job = await c.submit({**REQ, "steps": 12})
            previews = [e async for e in job.events(previews=True) if e.type == "preview"]
            return previews

    previews = run(main())
    assert previews, "no preview arrived"
    steps = [p.data["step"] for p in previews]
    assert steps == sorted(steps) and len(steps) < 12  # throttled: not one per step
    assert Image.open(io.BytesIO(previews[-1].preview)).format == "JPEG"

    async def without():
        async with client(server.url) as c:
            job = await c.submit({**REQ, "steps": 3})
            return [e.type async for e in job.events(previews=True)]

    assert "preview" not in run(without())


def test_owners_see_only_their_jobs_and_subscribers_replay(server, closed_gate):
    async def main():
        async with client(server.url) as a, client(server.url) as b:
            job = await a.submit({**REQ, "prompt": "gate owner"})
            await asyncio.to_thread(closed_gate.wait_entered)
            with pytest.raises(BridgeError) as info:
                await b.cancel(job.id)
            assert info.value.code == "unknown_job"
            watched = await b.subscribe(job.id)
            closed_gate.open()
            mine = await job.result(30)
            theirs = await watched.result(30)
            assert theirs.images[0].data == mine.images[0].data
            assert [e.type for e in watched.history] == [e.type for e in job.history]
            other = await b.submit(REQ)
            await other.result(30)
            assert set(a.jobs) == {job.id} and set(b.jobs) == {job.id, other.id}

    run(main())


def test_fair_queue_across_clients(server, closed_gate):
    async def main():
        async with client(server.url) as c, client(server.url) as a, client(server.url) as b:
            blocker = await c.submit({**REQ, "prompt": "gate blocker"})
            await asyncio.to_thread(closed_gate.wait_entered)
            a_jobs = [await a.submit({**REQ, "seed": i}) for i in range(3)]
            b_job = await b.submit(REQ)
            positions = []
            for j in (*a_jobs, b_job):  # the queued event follows the submit reply
                positions.append((await anext(j.events())).data["position"])
            closed_gate.open()
            for j in (*a_jobs, b_job, blocker):
                await j.wait(30)
            started = sorted((*a_jobs, b_job), key=lambda j: next(e.data["t"] for e in j.history
                                                                   if e.type == "started"))
            return positions, [j.id for j in started], [j.id for j in a_jobs], b_job.id

    positions, order, a_ids, b_id = run(main())
    assert order == [a_ids[0], b_id, a_ids[1], a_ids[2]]
    assert positions == [0, 1, 2, 1]  # at submission time


def test_resume_after_a_dropped_connection_delivers_the_result(server, closed_gate):
    async def main():
        c = client(server.url, ping_interval=0.2)
        await c.connect()
        session = c.session
        job = await c.submit({**REQ, "prompt": "gate resume"})
        await asyncio.to_thread(closed_gate.wait_entered)
        await c.drop_connection()
        await asyncio.sleep(0.05)
        closed_gate.open()  # the result is produced while the client may be away
        result = await job.result(30)
        assert c.session == session and c.reconnects >= 1 and c.welcome["resumed"]
        assert [e.type for e in job.history].count("result") == 1 and result.images[0].data
        seqs = [e.seq for e in job.history]
        assert seqs == sorted(set(seqs))
        # a new client object can take the session over; the old connection is closed as superseded
        other = client(server.url, session=c.session, last_seq=c.last_seq, reconnect=False)
        await other.connect()
        assert other.welcome["resumed"] and not other.welcome["gap"]
        await asyncio.sleep(0.2)
        assert c._ws is None or c._ws.close_code in (None, P.CLOSE_SUPERSEDED)
        await other.close(bye=True)
        await c.close()
        stale = client(server.url, session=session, reconnect=False)
        await stale.connect()
        assert not stale.welcome["resumed"] and "reason" in stale.welcome
        await stale.close()

    run(main())


def test_application_ping_and_limits(engine):
    with serve_in_thread(engine, limits={"max_pending_jobs": 2, "ping_interval_s": 1}) as srv:
        async def main():
            ws, welcome = await raw_hello(srv.url)
            assert welcome["type"] == "welcome"
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            check_frame(msg)
            assert msg["type"] == "ping"
            await ws.send(json.dumps({"v": 1, "type": "ping", "id": "p1", "data": {"t": 1.5}}))
            pong = json.loads(await ws.recv())
            assert pong["type"] == "pong" and pong["id"] == "p1" and pong["data"]["t"] == 1.5
            await ws.close()
            async with client(srv.url) as c:
                assert await c.ping() < 1
                await c.submit({**REQ, "steps": 2})
                await c.submit({**REQ, "steps": 2})
                with pytest.raises(BridgeError) as info:
                    await c.submit(REQ)
                assert info.value.code == "limit_exceeded" and info.value.retryable
                for j in list(c.jobs.values()):
                    await j.wait(30)

        run(main())


def test_sdcore_serve_command(tiny_sd1_model):
    import queue
    import subprocess
    import sys
    import threading
    from pathlib import Path

    import requests

    exe = str(Path(sys.executable).parent / "sdcore")
    refused = subprocess.run([exe, "serve", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--token" in refused.stderr
    proc = subprocess.Popen([exe, "serve", "--port", "0", "--model", str(tiny_sd1_model), "--a1111-api",
                             "--a1111-port", "0"], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        urls = {}
        while len(urls) < 2:
            line = lines.get(timeout=120)
            if line.startswith("sdcore bridge: "):
                urls["ws"] = line.split()[2]
            elif line.startswith("A1111-compatible API: "):
                urls["http"] = line.split()[2]

        async def main():
            async with client(urls["ws"]) as c:
                return await c.list_models()

        assert run(main())[0]["name"] == "tiny-sd15"
        assert requests.get(urls["http"] + "sd-models", timeout=30).json()[0]["model_name"] == "tiny-sd15"
    finally:
        proc.terminate()
        proc.wait(30)
