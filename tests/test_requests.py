"""Typed requests: defaults, validation messages that say what to change, JSON schema."""

import json
import subprocess
import sys

import pytest

from sdcore import Engine, GenerationRequest, Mode
from sdcore.errors import InvalidRequest, UnknownSampler


def test_defaults_and_mode_inference():
    assert GenerationRequest().resolved_mode is Mode.txt2img
    assert GenerationRequest(init_image="x.png").resolved_mode is Mode.img2img
    assert GenerationRequest(init_image="x.png", mask="m.png").resolved_mode is Mode.inpaint


@pytest.mark.parametrize("field,value,message", [
    ("width", 500, "width must be a multiple of 8, got 500; use 496 or 504"),
    ("height", 30, "height must be between 64 and 4096 pixels, got 30"),
    ("steps", 0, "steps: Input should be greater than or equal to 1"),
    ("denoising_strength", 1.5, "denoising_strength: Input should be less than or equal to 1"),
    ("colour", "red", "colour: unknown field; see `sdcore schema`"),
])
def test_invalid_fields_say_what_to_change(field, value, message):
    with pytest.raises(InvalidRequest) as info:
        GenerationRequest.parse({field: value})
    assert message in str(info.value)


def test_inpaint_needs_a_mask_and_image():
    with pytest.raises(InvalidRequest, match="mode inpaint needs an init_image"):
        GenerationRequest.parse({"mode": "inpaint"})


def test_zero_strength_img2img_is_refused():
    with pytest.raises(InvalidRequest, match="denoising_strength 0 leaves the image unchanged"):
        GenerationRequest.parse({"init_image": "x.png", "denoising_strength": 0})


def test_unknown_sampler_lists_known_ones():
    engine = Engine(device="cpu")
    with pytest.raises(UnknownSampler) as info:
        engine.validate({"sampler": "Euler b"})
    assert "Euler a" in str(info.value) and "DPM++ 2M" in str(info.value)


def test_request_json_round_trip():
    request = GenerationRequest(prompt="a, b", seed=5, width=512, height=768, sampler="Euler a")
    again = GenerationRequest.model_validate_json(json.dumps(request.to_json_dict()))
    assert again == request.model_copy(update={"mode": Mode.txt2img})


def test_schema_command_prints_the_request_schema():
    out = subprocess.run([sys.executable, "-m", "sdcore.cli", "schema"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["title"] == "GenerationRequest"
    assert schema["properties"]["steps"]["default"] == 20
    assert schema["properties"]["init_image"]["anyOf"][0]["type"] == "string"
    assert "hello" in schema["properties"]["options"]["properties"]
