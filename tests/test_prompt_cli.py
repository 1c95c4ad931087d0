"""`sdcore prompt parse` and `sdcore prompt tokens`."""

import json
import subprocess
import sys

from click.testing import CliRunner
from sdcore_plugins.prompt_language import parse
from sdcore_plugins.prompt_language.cli import prompt_group


def invoke(*args):
    return CliRunner().invoke(prompt_group, list(args))


def test_parse_prints_the_parsed_prompt_as_json():
    prompt = "a <lora:x:0.8> [cat:dog:0.5] AND (b:1.2):0.5"
    out = invoke("parse", "--steps", "20", prompt)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data == json.loads(json.dumps(parse(prompt, 20)))
    assert data["extra_networks"] == {"lora": [["x", "0.8"]]}
    assert [s["until"] for s in data["subprompts"][0]["schedule"]] == [10, 20]
    assert data["subprompts"][1]["weight"] == 0.5
    hires = json.loads(invoke("parse", "--steps", "20", "--hires-steps", "10", "--compact", "[a:b:25]").output)
    assert [(s["until"], s["text"]) for s in hires["subprompts"][0]["schedule"]] == [(5, "a"), (10, "b")]
    negative = json.loads(invoke("parse", "--steps", "4", "--negative", "a AND b").output)
    assert negative["subprompts"][0]["text"] == "a AND b"


def test_parse_errors_point_at_the_position():
    out = invoke("parse", "--steps", "20", "a (b:1..2)")
    assert out.exit_code == 1
    assert "position 5" in out.output and "\n  a (b:1..2)\n       ^" in out.output
    assert invoke("parse", "--steps", "20", "(a BREAK b)").exit_code == 1
    lenient = invoke("parse", "--steps", "20", "--lenient", "(a BREAK b)")
    assert lenient.exit_code == 0 and ["BREAK", -1.1] in json.loads(lenient.output)["subprompts"][0]["schedule"][0]["chunks"]


def test_tokens_prints_each_chunk(tiny_sd1_model):
    out = invoke("tokens", "cat " * 80)
    assert out.exit_code == 0 and out.output == "75/75\n5/75\n"
    assert json.loads(invoke("tokens", "--json", "a BREAK b").output) == [1, 1]
    assert json.loads(invoke("tokens", "--json", "--model", str(tiny_sd1_model), "a red cat").output) == [3]


def test_prompt_commands_are_registered_in_sdcore():
    out = subprocess.run([sys.executable, "-m", "sdcore.cli", "prompt", "parse", "--steps", "4", "--compact", "[a|b]"],
                         capture_output=True, text=True, check=True)
    assert [s["text"] for s in json.loads(out.stdout)["subprompts"][0]["schedule"]] == ["a", "b", "a", "b"]
