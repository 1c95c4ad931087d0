"""Tests of the example plugin, run against the installed package like any third-party plugin's tests."""

import json
import subprocess
import sys

from sdcore import Engine, GenerationRequest
from sdcore.infotext import parse_infotext


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdcore.cli", *args], capture_output=True, text=True, check=False)


def test_listed_as_a_third_party_plugin():
    listed = json.loads(run_cli("plugins", "--json").stdout)
    hello = next(p for p in listed if p["name"] == "hello")
    assert hello == {
        "name": "hello", "version": "0.1.0", "builtin": False,
        "hooks": ["register_commands", "register_request_options"],
    }


def test_command_added_to_the_cli():
    out = run_cli("hello", "Ada")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Hello, Ada, from an sdcore plugin!"


def test_option_in_schema_and_infotext_round_trip(tiny_sd1_model):
    with Engine(device="cpu", default_model=tiny_sd1_model) as engine:
        schema = engine.request_schema()
        assert schema["properties"]["options"]["properties"]["hello"]["properties"]["signature"]["maxLength"] == 100
        result = engine.generate(GenerationRequest(prompt="a cat", steps=2, width=64, height=64, seed=3,
                                                   options={"hello": {"signature": "Ada, 1815"}}))
        params = parse_infotext(result.infotexts[0]).params
        assert params["Hello signature"] == "Ada, 1815"
        from sdcore.metadata import request_from_infotext

        again = request_from_infotext(result.infotexts[0], engine=engine)
        assert again.options["hello"].signature == "Ada, 1815"
