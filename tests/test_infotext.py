"""A1111 infotext: exact layout, A1111's parsing rules and quirks, PNG/JPEG/WEBP storage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from sdcore.errors import ImageError, InvalidRequest
from sdcore.infotext import (
    A1111_KEY_ORDER,
    Infotext,
    a1111_params,
    decode_user_comment,
    encode_user_comment,
    format_infotext,
    format_name_hashes,
    parse_infotext,
    parse_name_hashes,
    png_bytes,
    read_infotext,
    save_png,
)

# ------------------------------------------------------------------------------------------------ format


def test_layout_is_exactly_a1111s() -> None:
    text = format_infotext(
        "a cat",
        "blurry",
        {"Seed": 42, "Steps": 20, "Size": "512x512", "Sampler": "Euler a", "CFG scale": 7.0},
    )
    assert (
        text
        == "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512"
    )


def test_empty_negative_prompt_has_no_line() -> None:
    assert (
        format_infotext("p", "", {"Steps": 1, "Seed": 2, "Size": "8x8"}) == "p\nSteps: 1, Seed: 2, Size: 8x8"
    )


def test_key_order_fixed_then_given_then_version_and_user() -> None:
    params = {
        "Version": "v1.10.1",
        "Lora hashes": "x: 1",
        "Tiling": "True",
        "User": "me",
        "Hires upscale": 2,
        "Steps": 20,
        "RNG": "CPU",
        "Model hash": "abc",
    }
    line = format_infotext("", "", params)
    keys = [part.split(":")[0] for part in line.split(", ")]
    assert keys == ["Steps", "Model hash", "RNG", "Tiling", "Lora hashes", "Hires upscale", "Version", "User"]


def test_constant_key_order_is_a1111s() -> None:
    assert A1111_KEY_ORDER[:8] == [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    ]  # fmt: skip
    assert A1111_KEY_ORDER[-3:] == ["Init image hash", "RNG", "Tiling"]
    assert len(A1111_KEY_ORDER) == 26


def test_none_omitted_and_flag_written_bare() -> None:
    text = format_infotext("p", "", {"Steps": 20, "Face restoration": None, "NGMS": "NGMS", "Seed": 1})
    assert text == "p\nSteps: 20, Seed: 1, NGMS"


def test_values_with_comma_colon_newline_are_json_quoted_unicode_kept() -> None:
    text = format_infotext(
        "p", "", {"Steps": 1, "Lora hashes": "a: 123, b: 456", "Note": 'línea\n"dos"', "Emoji": "猫,犬"}
    )
    assert text.endswith('Steps: 1, Lora hashes: "a: 123, b: 456", Note: "línea\\n\\"dos\\"", Emoji: "猫,犬"')


def test_unreadable_keys_are_refused() -> None:
    for key in ("A", "Bad: key", "Bad,key", " lead", "-x"):
        with pytest.raises(InvalidRequest, match="cannot be read back"):
            format_infotext("p", "", {"Steps": 1, key: "v", "Seed": 1})


# ------------------------------------------------------------------------------------------------- parse


def test_parse_a1111_docstring_example() -> None:
    text = (
        "girl with an artist's beret, ((eyeshadow)), (coquettish)\n"
        "Negative prompt: ugly, (((deformed))), [blurry]\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    info = parse_infotext(text)
    assert info.prompt == "girl with an artist's beret, ((eyeshadow)), (coquettish)"
    assert info.negative_prompt == "ugly, (((deformed))), [blurry]"
    assert info.params == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }


def test_last_line_with_fewer_than_three_pairs_is_prompt() -> None:
    info = parse_infotext("a cat\nSteps: 20, Seed: 5")
    assert info == Infotext("a cat\nSteps: 20, Seed: 5", "", {})


def test_three_pairs_are_params_even_when_meant_as_prompt() -> None:
    info = parse_infotext("style: anime, mood: dark, lighting: soft")
    assert info == Infotext("", "", {"style": "anime", "mood": "dark", "lighting": "soft"})


def test_trailing_line_after_params_turns_them_into_prompt() -> None:
    text = "p\nSteps: 20, Seed: 1, Size: 8x8\nUsed embeddings: foo"
    assert parse_infotext(text) == Infotext("p\nSteps: 20, Seed: 1, Size: 8x8\nUsed embeddings: foo", "", {})


def test_one_letter_keys_vanish() -> None:
    info = parse_infotext("p\nSteps: 20, A: 1, Seed: 5, Size: 512x512")
    assert info.params == {"Steps": "20", "Seed": "5", "Size": "512x512"}


def test_trailing_spaces_kept_empty_values_dropped() -> None:
    info = parse_infotext("p\nSteps: 20 , Seed: , CFG scale: 7, Size: 8x8")
    assert info.params == {"Steps": "20 ", "CFG scale": "7", "Size": "8x8"}


def test_unterminated_quote_leaves_a1111s_fragment() -> None:
    info = parse_infotext('p\nSteps: 20, Lora hashes: "a: 123, b: 456, Seed: 1')
    assert info.params == {"Steps": "20", "Lora hashes": '"a: 123', "Seed": "1"}


def test_civitai_unquoted_json_is_torn_apart() -> None:
    info = parse_infotext('p\nSteps: 20, Hashes: {"vae": "x", "lora:foo": "y"}, Seed: 1')
    assert info.params == {"Steps": "20", "Hashes": '{"vae": "x"', "lora": 'foo": "y"}', "Seed": "1"}


def test_negative_prompt_lines_and_prefix_rules() -> None:
    text = "line one\n  line two  \nNegative prompt: n1\nn2\nNegative prompt:n3\nSteps: 1, Seed: 2, Size: 3x4"
    info = parse_infotext(text)
    assert info.prompt == "line one\nline two"
    assert info.negative_prompt == "n1\nn2\nn3"


def test_negative_prompt_mid_line_is_text() -> None:
    info = parse_infotext("x Negative prompt: y\nSteps: 1, Seed: 2, Size: 3x4")
    assert (info.prompt, info.negative_prompt) == ("x Negative prompt: y", "")


def test_quoted_value_that_is_not_json_is_kept_raw() -> None:
    info = parse_infotext('p\nSteps: 1, Bad: "a\\qb", Seed: 2')
    assert info.params["Bad"] == '"a\\qb"'


def test_duplicate_key_keeps_last_value() -> None:
    assert parse_infotext("p\nSteps: 1, Steps: 2, Seed: 3").params == {"Steps": "2", "Seed": "3"}


# ------------------------------------------------------------------------------------------- round trips

ROUND_TRIP_PROMPTS = [
    ("a cat, on a mat: sitting", "blurry, low quality"),
    ('a "quoted" word, (masterpiece:1.2)', ""),
    ("first line\nsecond line, with comma", "neg one\nneg two: colon"),
    ("猫と犬 — ünïcödé ✓", "ネガティブ"),
    ("", "only negative"),
    ("", ""),
]


@pytest.mark.parametrize(("prompt", "negative"), ROUND_TRIP_PROMPTS)
def test_round_trip_prompts(prompt: str, negative: str) -> None:
    params = {
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "Seed": "42",
        "Size": "512x768",
        "Lora hashes": "a: 123, b: 456",
        "Note": 'a "b", c\nd: e',
        "Empty": "",
        "Spaced": "  padded  ",
        "Quoted": '"x"',
        "Version": "sdcore 0.1.0",
    }
    text = format_infotext(prompt, negative, params)
    info = parse_infotext(text)
    assert info == Infotext(prompt, negative, params)
    assert info.to_text() == text
    assert list(info.params) == list(params)  # same (A1111) order


def test_round_trip_non_string_values_come_back_as_their_str() -> None:
    text = format_infotext("p", "", {"Steps": 20, "CFG scale": 6.5, "Seed": 1, "Tiling": True})
    assert parse_infotext(text).params == {"Steps": "20", "CFG scale": "6.5", "Seed": "1", "Tiling": "True"}


def test_name_hashes_helpers() -> None:
    value = format_name_hashes({"my:lora,v2": "0123456789ab", "other": "ba9876543210", "nohash": ""})
    assert value == "mylorav2: 0123456789ab, other: ba9876543210"
    text = format_infotext("p", "", {"Steps": 1, "Seed": 2, "Lora hashes": value})
    assert 'Lora hashes: "mylorav2: 0123456789ab, other: ba9876543210"' in text
    assert parse_name_hashes(parse_infotext(text).params["Lora hashes"]) == {
        "mylorav2": "0123456789ab",
        "other": "ba9876543210",
    }


# ----------------------------------------------------------------------------------------- a1111_params


def test_a1111_params_splits_sizes_and_adds_defaults() -> None:
    info = parse_infotext(
        "p\nNegative prompt: n\nSteps: 20, Seed: 5, Size: 512x768, Hires resize: 1024 x 1536"
    )
    res = a1111_params(info)
    assert res["Prompt"] == "p" and res["Negative prompt"] == "n"
    assert res["Size-1"] == "512" and res["Size-2"] == "768" and "Size" not in res
    assert res["Hires resize"] == "1024 x 1536"  # spaces: not split
    assert res["Hires resize-1"] == 0 and res["Hires resize-2"] == 0
    assert res["Clip skip"] == "1"
    assert res["Schedule type"] == "Automatic"
    assert res["RNG"] == "GPU"
    assert res["Masked area padding"] == 32
    assert res["FP8 weight"] == "Disable"
    assert "Cache FP16 weight for LoRA" not in res
    assert res["Refiner switch by sampling steps"] is False
    assert "Emphasis" not in res
    assert "Downcast alphas_cumprod" not in res  # no Version: no back-compat flags


def test_a1111_params_emphasis_and_hypernet_and_fp8() -> None:
    res = a1111_params(
        parse_infotext("a (cat) BREAK dog\nSteps: 1, Seed: 2, Hypernet: hn, FP8 weight: Enable")
    )
    assert res["Emphasis"] == "Original"
    assert res["Prompt"] == "a (cat) BREAK dog<hypernet:hn:1.0>"
    assert res["Cache FP16 weight for LoRA"] is False
    assert "Emphasis" not in a1111_params(
        parse_infotext("a cat BREAK dog (x:1.0)\nSteps: 1, Seed: 2, Size: 1x1")
    )
    assert a1111_params(parse_infotext("a [b:c:0.5]\nSteps: 1, Seed: 2, Size: 1x1"))["Emphasis"] == "Original"


def test_a1111_params_old_hires_fix_first_pass() -> None:
    res = a1111_params(parse_infotext("p\nSteps: 1, Seed: 2, Size: 1024x768, First pass size: 0x0"))
    assert (res["Size-1"], res["Size-2"]) == (640, 448)
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (1024, 768)


def test_a1111_params_version_backcompat() -> None:
    old = a1111_params(parse_infotext("a [b:c:3]\nSteps: 1, Sampler: DDIM, Version: v1.5.1, Refiner: r"))
    assert old["Old prompt editing timelines"] is True
    assert old["Pad conds v0"] is True
    assert old["Downcast alphas_cumprod"] is True
    assert old["Refiner switch by sampling steps"] is True
    new = a1111_params(parse_infotext("a [b:c:3]\nSteps: 1, Sampler: DDIM, Version: v1.10.1"))
    assert "Old prompt editing timelines" not in new and "Downcast alphas_cumprod" not in new
    forge = a1111_params(parse_infotext("a [b]\nSteps: 1, Seed: 1, Version: f2.0.1v1.10.1-previous-1-g1"))
    assert "Downcast alphas_cumprod" not in forge


def test_a1111_params_hires_prompt_identical_is_blanked() -> None:
    text = 'p\nSteps: 1, Seed: 2, Hires prompt: p, Hires negative prompt: "x,y", Version: v1.10.1'
    res = a1111_params(parse_infotext(text))
    assert res["Hires prompt"] == "" and res["Hires negative prompt"] == "x,y"
    old = a1111_params(parse_infotext("p\nSteps: 1, Seed: 2, Hires prompt: p, Version: v1.8.0"))
    assert old["Hires prompt"] == "p"


# ------------------------------------------------------------------------------------------------ images

INFOTEXT = format_infotext(
    "a cat, 猫", "blurry", {"Steps": 20, "Sampler": "Euler a", "Seed": 1, "Lora hashes": "a: 1, b: 2"}
)


def test_save_png_then_read_back_with_pillow(tmp_path: Path) -> None:
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    path = save_png(image, tmp_path / "sub" / "out.png", INFOTEXT)
    assert path == tmp_path / "sub" / "out.png"
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind
    with Image.open(path) as loaded:
        assert loaded.info["parameters"] == INFOTEXT
        assert loaded.size == (16, 8) and loaded.getpixel((3, 3)) == (10, 20, 30)
    assert b"iTXt" in path.read_bytes()  # not latin-1: international text chunk
    assert read_infotext(path) == INFOTEXT
    assert read_infotext(str(path)) == INFOTEXT
    assert parse_infotext(read_infotext(path) or "").prompt == "a cat, 猫"


def test_latin1_infotext_uses_text_chunk() -> None:
    data = png_bytes(Image.new("L", (4, 4)), "a cat\nSteps: 1, Seed: 2, Size: 4x4")
    assert b"tEXt" in data and b"iTXt" not in data
    assert read_infotext(data) == "a cat\nSteps: 1, Seed: 2, Size: 4x4"


def test_png_bytes_is_lossless_and_none_writes_no_chunk() -> None:
    image = Image.frombytes("RGBA", (3, 2), bytes(range(24)))
    data = png_bytes(image, None)
    with Image.open(io.BytesIO(data)) as loaded:
        assert loaded.tobytes() == image.tobytes() and loaded.mode == "RGBA"
    assert read_infotext(data) is None


def test_png_written_by_pillow_directly_is_read() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 1, Seed: 2, Size: 1x1", zip=True)  # zTXt
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG", pnginfo=info)
    assert read_infotext(buffer.getvalue()) == "x\nSteps: 1, Seed: 2, Size: 1x1"


def _with_user_comment(fmt: str, comment: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, format=fmt, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment_is_read(fmt: str) -> None:
    data = _with_user_comment(fmt, encode_user_comment(INFOTEXT))
    assert read_infotext(data) == INFOTEXT


def test_user_comment_encoding_is_a1111s() -> None:
    assert encode_user_comment("Hi") == b"UNICODE\x00\x00H\x00i"
    assert decode_user_comment(b"UNICODE\x00\x00H\x00i") == "Hi"
    assert decode_user_comment(b"UNICODE\x00H\x00i\x00") == "Hi"  # little-endian writers
    assert decode_user_comment(b"ASCII\x00\x00\x00Hi\x00") == "Hi"
    assert decode_user_comment(b"plain utf-8 \xe2\x9c\x93") == "plain utf-8 ✓"


def test_jpeg_comment_without_exif_is_read() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG", comment=b"c\nSteps: 1, Seed: 2, Size: 8x8")
    assert read_infotext(buffer.getvalue()) == "c\nSteps: 1, Seed: 2, Size: 8x8"


def test_novelai_metadata_is_converted() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "NovelAI")
    info.add_text("Description", "a fox")
    info.add_text(
        "Comment",
        json.dumps({"uc": "bad", "steps": 28, "sampler": "k_euler_ancestral", "scale": 11, "seed": 9}),
    )
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buffer, format="PNG", pnginfo=info)
    text = read_infotext(buffer.getvalue())
    assert text == (
        "a fox\nNegative prompt: bad\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 11, Seed: 9, Size: 64x32, Clip skip: 2, ENSD: 31337"
    )


def test_read_from_open_image_and_absent_metadata(tmp_path: Path) -> None:
    image = Image.new("RGB", (2, 2))
    image.info["parameters"] = "p\nSteps: 1, Seed: 2, Size: 2x2"
    assert read_infotext(image) == "p\nSteps: 1, Seed: 2, Size: 2x2"
    path = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(path)
    assert read_infotext(path) is None


def test_undecodable_and_missing_files_raise_image_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageError) as info:
        read_infotext(bad)
    assert str(bad) in str(info.value) and "PNG, JPEG or WEBP" in str(info.value)
    with pytest.raises(ImageError, match="no file at"):
        read_infotext(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="given image data"):
        read_infotext(b"\x89PNG garbage")
