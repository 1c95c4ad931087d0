"""The `sdcore` command line, run as a user runs it: a subprocess, real files."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from sdcore.infotext import parse_infotext, read_infotext


def sdcore(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "sdcore.cli", *args], capture_output=True, text=True,
                          input=stdin, check=False)


def test_generate_writes_pngs_named_by_seed_with_infotext(tmp_path, tiny_sd1_model):
    out = sdcore("generate", "a red circle, (bright:1.2)", "--model", str(tiny_sd1_model), "--steps", "2",
                 "-W", "64", "-H", "64", "--seed", "5", "--batch-size", "2", "--sampler", "Euler a",
                 "--negative", "blurry", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    paths = out.stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000-5.png", "00001-6.png"]
    assert "Generating" in out.stderr  # the progress bar
    info = parse_infotext(read_infotext(paths[1]))
    assert info.prompt == "a red circle, (bright:1.2)" and info.negative_prompt == "blurry"
    assert info.params["Seed"] == "6" and info.params["Sampler"] == "Euler a"
    # A second run continues the numbering instead of overwriting
    again = sdcore("generate", "x", "--model", str(tiny_sd1_model), "--steps", "1", "-W", "64", "-H", "64",
                   "--seed", "1", "--out", str(tmp_path), "--quiet")
    assert again.stdout.strip().endswith("00002-1.png")


def test_info_and_regenerate_bit_for_bit(tmp_path, tiny_sd1_model):
    first = sdcore("generate", "a blue square", "--model", str(tiny_sd1_model), "--steps", "3", "-W", "64",
                   "-H", "64", "--seed", "-1", "--cfg", "5.5", "--clip-skip", "2", "--out", str(tmp_path / "a"))
    path = first.stdout.strip()
    info = json.loads(sdcore("info", path, "--json").stdout)
    assert info["prompt"] == "a blue square" and info["params"]["CFG scale"] == "5.5"
    assert info["params"]["Clip skip"] == "2" and info["params"]["Model"] == tiny_sd1_model.stem
    again = sdcore("regenerate", path, "--model", str(tiny_sd1_model), "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again.stdout.strip())))
    assert read_infotext(path) == read_infotext(again.stdout.strip())


def test_infotext_parse_from_stdin():
    text = 'a cat, "quoted"\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Lora hashes: "x: 1, y: 2", Seed: 3'
    out = sdcore("infotext", "parse", stdin=text)
    assert json.loads(out.stdout) == {
        "prompt": 'a cat, "quoted"', "negative_prompt": "dog",
        "params": {"Steps": "20", "Sampler": "Euler a", "Lora hashes": "x: 1, y: 2", "Seed": "3"},
    }


def test_samplers_lists_a1111_names():
    out = sdcore("samplers", "--json")
    names = [s["name"] for s in json.loads(out.stdout)]
    for name in ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
                 "DDIM", "PLMS", "UniPC", "LCM"]:
        assert name in names


def test_errors_are_one_line_without_traceback(tmp_path, tiny_sd1_model):
    cases = [
        (["generate", "x", "--model", str(tmp_path / "none.safetensors")], "not found: no such file"),
        (["generate", "x", "--model", str(tiny_sd1_model), "--sampler", "Euler b"], "unknown sampler 'Euler b'; known samplers: Euler a"),
        (["generate", "x", "--model", str(tiny_sd1_model), "-W", "100"], "multiple of 8"),
        (["info", str(tiny_sd1_model)], "it is not an image file Pillow can decode"),
    ]
    for args, message in cases:
        out = sdcore(*args)
        assert out.returncode == 1, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], out.stderr
        assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = sdcore("--debug", "generate", "x", "--model", str(tmp_path / "none.safetensors"))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_pickle_needs_opt_in(tmp_path):
    import torch

    path = tmp_path / "m.ckpt"
    torch.save({"a": torch.zeros(1)}, path)
    out = sdcore("generate", "x", "--model", str(path))
    assert out.returncode == 1 and "--allow-pickle" in out.stderr
