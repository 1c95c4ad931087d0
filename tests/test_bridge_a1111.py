"""The A1111-compatible HTTP API, driven by the PyPI client `webuiapi` as an unchanged A1111 client."""

import base64
import io
import threading

import numpy as np
import pytest
import requests
from PIL import Image
from sdcore_bridges.testing import gate_for, serve_in_thread, shared_engine

from sdcore.infotext import parse_infotext

webuiapi = pytest.importorskip("webuiapi")
TOKEN = "a1111-token"


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
    with serve_in_thread(engine, token=TOKEN, a1111_port=0) as handle:
        yield handle


def api(server, user="alice", password=TOKEN):
    port = int(server.http_url.rsplit(":", 1)[1])
    client = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=1)
    client.set_auth(user, password)
    return client


def test_txt2img_with_a1111_fields(server, engine):
    result = api(server).txt2img(prompt="a red circle", negative_prompt="blur", width=64, height=64, seed=11,
                                 cfg_scale=5, batch_size=2, scheduler="karras")
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [11, 12] and result.info["seed"] == 11
    params = parse_infotext(result.info["infotexts"][0])
    assert params.prompt == "a red circle" and params.negative_prompt == "blur"
    assert params.params["Schedule type"] == "Karras" and params.params["CFG scale"] == "5"
    assert result.parameters["prompt"] == "a red circle"
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]  # PNG carries its infotext
    direct = engine.generate(dict(prompt="a red circle", negative_prompt="blur", width=64, height=64, seed=11,
                                  cfg_scale=5, steps=1, sampler="Euler", schedule_type="Karras", batch_size=2)).images[0]
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), np.asarray(direct.convert("RGB")))


def test_img2img_and_inpaint(server):
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    client = api(server)
    out = client.img2img(images=[init], prompt="x", width=64, height=64, seed=3, denoising_strength=0.6)
    assert out.image.size == (64, 64) and out.info["denoising_strength"] == 0.6
    inpainted = client.img2img(images=[init], mask_image=mask, prompt="x", width=64, height=64, seed=3,
                               mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    pixels = np.asarray(inpainted.image.convert("RGB"))
    keep = np.asarray(mask) == 0
    assert np.array_equal(pixels[keep], np.asarray(init)[keep])
    inverted = client.img2img(images=[init], mask_image=mask, prompt="x", width=64, height=64, seed=3,
                              mask_blur=0, inpaint_full_res=False, inpainting_mask_invert=1)
    pixels = np.asarray(inverted.image.convert("RGB"))
    assert np.array_equal(pixels[~keep], np.asarray(init)[~keep])


def test_lists_options_and_png_info(server, tiny_sd1_model):
    client = api(server)
    assert [m["title"] for m in client.get_sd_models()] == [tiny_sd1_model.name]
    assert "Euler a" in client.util_get_sampler_names()
    assert "karras" in client.util_get_scheduler_names()
    assert client.get_loras() == []
    assert client.util_get_current_model() == tiny_sd1_model.name
    client.util_set_model(tiny_sd1_model.name)
    assert client.get_options()["sd_model_checkpoint"] == tiny_sd1_model.name
    refused = client.set_options({"sd_model_checkpoint": "missing.safetensors"})  # webuiapi returns the body
    assert refused["error"] == "invalid_request" and "Unknown model" in refused["detail"]
    image = client.txt2img(prompt="p", width=64, height=64, seed=5).image
    info = client.png_info(image)
    assert info.info.startswith("p\nSteps: 1") and info.parameters["Seed"] == "5"
    assert info.parameters["Size-1"] == "64"
    progress = client.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0


def test_interrupt_stops_only_the_callers_job(server, gate):
    alice, bob = api(server, "alice"), api(server, "bob")
    gate.close()
    box = {}
    thread = threading.Thread(target=lambda: box.update(r=alice.txt2img(prompt="gate alice", width=64,
                                                                          height=64, seed=1)))
    thread.start()
    try:
        assert gate.wait_entered(30)
        assert bob.get_progress()["state"]["job_count"] == 0
        assert alice.get_progress()["state"]["job_count"] == 1
        assert bob.interrupt() == {"interrupted": []}
        assert len(alice.interrupt()["interrupted"]) == 1
    finally:
        gate.open()
        thread.join(30)
    assert box["r"].images == [] and box["r"].info["interrupted"] is True
    assert bob.txt2img(prompt="after", width=64, height=64, seed=2).image.size == (64, 64)


def test_auth_origin_and_bad_requests(server):
    base = server.http_url + "/sdapi/v1"
    assert requests.get(base + "/sd-models", timeout=10).status_code == 401
    assert requests.get(base + "/sd-models", auth=("alice", "wrong"), timeout=10).status_code == 401
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(base + "/sd-models", headers=ok, timeout=10).status_code == 200
    evil = {**ok, "Origin": "https://evil.example"}
    assert requests.get(base + "/sd-models", headers=evil, timeout=10).status_code == 403
    assert requests.get(base + "/nope", headers=ok, timeout=10).status_code == 404
    assert requests.get(base + "/txt2img", headers=ok, timeout=10).status_code == 405
    bad = [
        ("/txt2img", b"{not json", 400), ("/txt2img", b"[1]", 422),
        ("/txt2img", b'{"enable_hr": true}', 422), ("/txt2img", b'{"steps": 0}', 422),
        ("/txt2img", b'{"sampler_name": "Nope", "width": 64, "height": 64}', 422),
        ("/img2img", b'{"init_images": []}', 422), ("/img2img", b'{"init_images": ["%%%"]}', 422),
        ("/img2img", b'{"init_images": ["/etc/passwd"]}', 422),
        ("/png-info", b'{"image": "aGVsbG8="}', 422), ("/png-info", b"{}", 422),
    ]
    for path, body, status in bad:
        response = requests.post(base + path, data=body, headers=ok, timeout=30)
        assert response.status_code == status, (path, body, response.text)
        assert response.json()["detail"]
    img = io.BytesIO()
    Image.new("RGB", (64, 64)).save(img, format="PNG")
    payload = {"image": base64.b64encode(img.getvalue()).decode()}
    assert requests.post(base + "/png-info", json=payload, headers=ok, timeout=10).json()["info"] == ""
