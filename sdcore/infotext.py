"""A1111 "infotext": the generation parameters stored in an image, written and read the way A1111 does.

The infotext is what A1111, Civitai and many other tools read out of a PNG's `parameters` text chunk (or a
JPEG/WEBP's EXIF UserComment), so sdcore writes exactly A1111's layout (`create_infotext`) and reads with
exactly A1111's rules (`parse_generation_parameters`), quirks included, so that an image travels both ways:

    a photo of a cat, (masterpiece:1.2)
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Lora hashes: "cat: 0123456789ab"

Reading is split in two on purpose. `parse_infotext` gives the text as written (the values decoded from
their JSON quotes and nothing else), which is what sdcore needs to regenerate an image and what a user
wants to see. `a1111_params` turns that into A1111's full paste dictionary (`Size-1`/`Size-2`, defaults
for missing keys, version back-compat flags) for code that must behave like A1111's "paste" button.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdcore.errors import ImageError, InvalidRequest

if TYPE_CHECKING:
    from packaging.version import Version

__all__ = [
    "A1111_KEY_ORDER",
    "FINAL_KEYS",
    "Infotext",
    "a1111_params",
    "decode_user_comment",
    "encode_user_comment",
    "format_infotext",
    "format_name_hashes",
    "parse_infotext",
    "parse_name_hashes",
    "png_bytes",
    "read_infotext",
    "save_png",
]

A1111_KEY_ORDER: list[str] = [
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
]
"""Keys A1111's `create_infotext` always writes first, in this order (when their value is not None)."""

FINAL_KEYS: tuple[str, ...] = ("Version", "User")
"""Keys A1111 writes after every other key, in this order."""

NEGATIVE_PROMPT_PREFIX = "Negative prompt:"

# A1111's key/value pattern for the parameters line, written out with what each part means. Keys are a
# word character followed by at least one word character, space, '-' or '/', so one-letter keys never
# match. A value is a double-quoted string with backslash escapes (at least one character inside), or
# everything up to the next comma, trailing spaces included.
_PARAM_RE = re.compile(
    r"""
    \s*
    (?P<key> \w [\w \-/]+ )
    : \s*
    (?P<value> " (?: \\. | [^\\"] )+ "
             | [^,]* )
    (?: , | $ )
    """,
    re.VERBOSE,
)
_KEY_RE = re.compile(r"\w[\w \-/]+")
_IMAGE_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Infotext:
    """An infotext as written: prompt, negative prompt and the `Key: value` parameters.

    `params` holds every parameter of the last line in the order written, values as strings exactly as
    written except that JSON-quoted values are decoded. Nothing is added or split: `Size` stays `512x512`
    and a missing `Clip skip` stays missing; use `a1111_params` for A1111's expanded dictionary.
    """

    prompt: str
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        """Write this infotext back in A1111's layout (see `format_infotext`)."""
        return format_infotext(self.prompt, self.negative_prompt, self.params)


# ----------------------------------------------------------------------------------------------- writing


def _value_text(value: object) -> str:
    """A value as it appears after `Key: `, JSON-quoted when A1111's reader would otherwise misread it.

    A1111 quotes values containing `,`, `:` or a newline. sdcore also quotes the few other values that
    would not survive A1111's reader unquoted (empty strings, values with leading or trailing spaces,
    values that start with a double quote); A1111 reads all of these back correctly, so the output stays
    fully compatible while every value round-trips. Non-string values are quoted as their `str()`, never
    as JSON of another type, so the reader always gets a string back.
    """
    text = str(value)
    needs_quotes = (
        "," in text
        or ":" in text
        or "\n" in text
        or "\r" in text
        or text == ""
        or text != text.strip()
        or text.startswith('"')
    )
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def _ordered_keys(params: Mapping[str, object]) -> list[str]:
    """Keys in A1111's order: the fixed keys, then the others as given, then Version and User."""
    fixed = [k for k in A1111_KEY_ORDER if k in params]
    final = [k for k in FINAL_KEYS if k in params]
    middle = [k for k in params if k not in A1111_KEY_ORDER and k not in FINAL_KEYS]
    return fixed + middle + final


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """Write an infotext exactly as A1111's `create_infotext` lays it out.

    The prompt comes first (it may span lines), then `Negative prompt: ...` if the negative prompt is not
    empty, then one line of `Key: value` pairs joined by `, `; the whole text is stripped. Keys whose value
    is None are left out, and a key whose value is the key itself is written bare (A1111's flag style).

    Keys must be readable by A1111's parser (2+ characters: letters, digits, `_`, space, `-`, `/`, not
    starting with a space, `-` or `/`); other keys would be silently lost on reading, so they are refused.

    Note that A1111's reader only accepts the last line as parameters if it holds at least 3 pairs; with
    fewer it reads the line as part of the prompt. sdcore's engine always writes more than that.
    """
    pairs: list[str] = []
    for key in _ordered_keys(params):
        value = params[key]
        if value is None:
            continue
        if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
            raise InvalidRequest(
                f"infotext key {key!r} cannot be read back by A1111: keys need at least 2 characters from "
                "letters, digits, '_', space, '-' and '/', and must start with a letter, digit or '_'"
            )
        if isinstance(value, str) and value == key:
            pairs.append(key)
        else:
            pairs.append(f"{key}: {_value_text(value)}")
    negative = f"\n{NEGATIVE_PROMPT_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def format_name_hashes(hashes: Mapping[str, str]) -> str:
    """The value of `Lora hashes` / `TI hashes`: `name: hash, name: hash`.

    A1111 removes `:` and `,` from the names (they would break the list) and skips entries without a
    hash. The result contains `:` and `,`, so `format_infotext` JSON-quotes it, as A1111 does.
    """
    parts = []
    for name, short_hash in hashes.items():
        clean = name.replace(":", "").replace(",", "")
        if clean and short_hash:
            parts.append(f"{clean}: {short_hash}")
    return ", ".join(parts)


def parse_name_hashes(text: str) -> dict[str, str]:
    """Read a `Lora hashes` / `TI hashes` value back into `{name: hash}` (entries without `:` are skipped)."""
    result: dict[str, str] = {}
    for part in text.split(","):
        name, sep, short_hash = part.partition(":")
        if sep and name.strip():
            result[name.strip()] = short_hash.strip()
    return result


# ----------------------------------------------------------------------------------------------- parsing


def _decode_value(value: str) -> str:
    """A1111's `unquote`: a value in double quotes is JSON-decoded, falling back to the raw text."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def parse_infotext(text: str) -> Infotext:
    """Read an infotext with A1111's `parse_generation_parameters` rules, values as written.

    * The text is stripped and split into lines. The last line is the parameters line only if A1111's
      key/value pattern matches it at least 3 times; otherwise it belongs to the prompt. So
      `a cat\\nSteps: 20, Seed: 5` is all prompt, and a trailing line after the parameters (such as
      `Used embeddings: ...`) turns the parameters into prompt text.
    * Every other line is stripped. Lines before the first line starting with `Negative prompt:` form the
      prompt; from there on the prefix is removed from any line that starts with it and the lines form the
      negative prompt. `Negative prompt:` in the middle of a line is just text.
    * One-letter keys never match and vanish; an unquoted value keeps its trailing spaces (`Steps: 20 ,`
      gives `"20 "`); a value in double quotes is JSON-decoded (raw text if that fails, so an unterminated
      quote leaves a fragment); an empty value is dropped (A1111 reports an error and skips it). A key
      given twice keeps its last value.
    """
    *lines, last_line = text.strip().split("\n")
    if len(_PARAM_RE.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PROMPT_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PROMPT_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    params: dict[str, str] = {}
    for key, value in _PARAM_RE.findall(last_line):
        if value == "":
            continue
        params[key] = _decode_value(value)
    return Infotext(prompt="\n".join(prompt_lines), negative_prompt="\n".join(negative_lines), params=params)


# A1111 v1.10's defaults for keys missing from an infotext, in the order it adds them. Values keep A1111's
# mixed types (most are strings, a few ints or bools), because code that mimics A1111 compares them as such.
_A1111_DEFAULTS_BEFORE_HIRES_FIX: tuple[tuple[str, str | int | bool], ...] = (
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_A1111_DEFAULTS_AFTER_HIRES_FIX: tuple[tuple[str, str | int | bool], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def _old_hires_first_pass_size(width: int, height: int) -> tuple[int, int]:
    """A1111's first-pass size for old hires-fix infotexts: about 512x512 pixels, rounded up to 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires_fix(res: dict[str, str | int | bool]) -> None:
    """A1111's `restore_old_hires_fix_params` (with `use_old_hires_fix_width_height` off)."""
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    fw, fh = int(first_w), int(first_h)
    width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
    if fw == 0 or fh == 0:
        fw, fh = _old_hires_first_pass_size(width, height)
    res["Size-1"], res["Size-2"] = fw, fh
    res["Hires resize-1"], res["Hires resize-2"] = width, height


# The tokens of A1111's emphasis syntax, tried in this order.
_ATTENTION_RE = re.compile(
    r"""
      \\ [()\[\]\\]              # an escaped bracket or backslash: literal text
    | \\                        # a lone backslash: literal text
    | [(\[]                      # an opening bracket
    | : \s* ([+-]?[.\d]+) \s* \)  # ':weight)' closing a round bracket with an explicit weight
    | [)\]]                      # a closing bracket
    | [^\\()\[\]:]+              # a run of plain text
    | :                         # a colon that is not part of a weight
    """,
    re.VERBOSE,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _uses_emphasis(prompt: str) -> bool:
    """Whether A1111's attention parser gives any text run a weight other than 1 (BREAK excluded).

    A1111 sets `Emphasis: Original` on old infotexts whose prompts use emphasis. This follows its
    `parse_prompt_attention` arithmetic (1.1 per `(`, 1/1.1 per `[`, explicit `:w)` weights, unclosed
    brackets applied at the end). Where A1111 raises on a malformed weight such as `(a:1..2)`, the prompt
    is taken to use emphasis instead.
    """
    texts: list[str] = []
    weights: list[float] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for i in range(start, len(weights)):
            weights[i] *= factor

    def add(text: str, weight: float) -> None:
        texts.append(text)
        weights.append(weight)

    for match in _ATTENTION_RE.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            add(token[1:], 1.0)
        elif token == "(":
            round_open.append(len(weights))
        elif token == "[":
            square_open.append(len(weights))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                return True
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK_RE.split(token)):
                if i > 0:
                    add("BREAK", -1.0)
                add(part, 1.0)
    for pos in round_open:
        multiply(pos, 1.1)
    for pos in square_open:
        multiply(pos, 1 / 1.1)
    return any(w != 1.0 and t != "BREAK" for t, w in zip(texts, weights, strict=True))


def _parse_version(text: object) -> Version | None:
    """A1111's `infotext_versions.parse_version`: cut at the second '-', then PEP 440; None if unparsable."""
    if not isinstance(text, str):
        return None
    from packaging.version import InvalidVersion, Version

    match = re.match(r"([^-]+-[^-]+)-.*", text)
    if match:
        text = match.group(1)
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _version(text: str) -> Version:
    """A version constant A1111 compares against (always parsable)."""
    from packaging.version import Version

    return Version(text)


def a1111_params(info: Infotext) -> dict[str, str | int | bool]:
    """The dictionary A1111 v1.10's `parse_generation_parameters` returns for this infotext.

    Assumes A1111's default settings (no saved styles, `infotext_styles = "Apply if any"`, nothing skipped,
    `auto_backcompat` on). On top of the values as written:

    * `Prompt` and `Negative prompt` keys; a `Hypernet` appends `<hypernet:NAME:STRENGTH>` to the prompt;
    * a value of the form `<digits>x<digits>` becomes `<Key>-1` and `<Key>-2` (`Size: 512x512` gives
      `Size-1: "512"`, `Size-2: "512"`; `512 x 512` is not split);
    * defaults for missing keys, with A1111's mixed types: `Clip skip` "1", `Hires resize-1/-2` 0,
      `Masked area padding` 32, `RNG` "GPU", `Schedule type` "Automatic", `FP8 weight` "Disable", ...;
    * old hires-fix infotexts (`First pass size`) are converted, turning the sizes into ints;
    * a Hires prompt identical to the prompt is blanked (for Version > 1.8.0-139 or no usable Version);
    * `Emphasis: Original` when missing and a prompt uses emphasis;
    * version back-compat flags (`Old prompt editing timelines`, `Pad conds v0`, `Downcast alphas_cumprod`,
      `Refiner switch by sampling steps`) for infotexts from older A1111 versions.
    """
    res: dict[str, str | int | bool] = {}
    for key, value in info.params.items():
        match = _IMAGE_SIZE_RE.match(value)
        if match:
            res[f"{key}-1"] = match.group(1)
            res[f"{key}-2"] = match.group(2)
        else:
            res[key] = value

    prompt, negative = info.prompt, info.negative_prompt
    if "Hires prompt" in res or "Hires negative prompt" in res:
        version_now = _parse_version(res.get("Version"))
        if version_now is None or version_now > _version("1.8.0-139"):
            if res.get("Hires prompt", prompt) == prompt:
                res["Hires prompt"] = ""
            if res.get("Hires negative prompt", negative) == negative:
                res["Hires negative prompt"] = ""

    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    res.setdefault("Clip skip", "1")
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        res["Prompt"] = f"{res['Prompt']}<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for key, default in _A1111_DEFAULTS_BEFORE_HIRES_FIX:
        res.setdefault(key, default)
    _restore_old_hires_fix(res)
    for key, default in _A1111_DEFAULTS_AFTER_HIRES_FIX:
        res.setdefault(key, default)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and (_uses_emphasis(prompt) or _uses_emphasis(negative)):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)

    ver = _parse_version(res.get("Version"))
    if ver is not None:
        v160, v170_tsnr, v180 = _version("1.6.0"), _version("v1.7.0-225"), _version("1.8.0")
        if ver < v160 and "[" in str(res.get("Prompt", "")):
            res["Old prompt editing timelines"] = True
        if ver < v160 and res.get("Sampler", "") in ("DDIM", "PLMS"):
            res["Pad conds v0"] = True
        if ver < v170_tsnr:
            res["Downcast alphas_cumprod"] = True
        if ver < v180 and res.get("Refiner"):
            res["Refiner switch by sampling steps"] = True
    return res


# ------------------------------------------------------------------------------------------ EXIF comment

_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_JIS_PREFIX = b"JIS\x00\x00\x00\x00\x00"
_UNDEFINED_PREFIX = b"\x00" * 8
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def encode_user_comment(text: str) -> bytes:
    """An EXIF UserComment in A1111's "unicode" encoding: `b"UNICODE\\0"` then UTF-16 big-endian.

    That is what A1111 (through piexif) writes into JPEG and WEBP files; store it under tag 0x9286 of the
    Exif IFD (0x8769).
    """
    return _UNICODE_PREFIX + text.encode("utf-16-be")


def decode_user_comment(data: bytes | str) -> str:
    """Decode an EXIF UserComment written by A1111 or by other tools.

    The 8-byte prefix names the character code. "UNICODE" is UTF-16: big-endian as A1111 writes it, with
    a byte-order mark or the obvious zero-byte pattern of little-endian text (some Windows tools) honoured.
    Unknown or missing prefixes fall back to UTF-8 ignoring bad bytes, as A1111 does.
    """
    if isinstance(data, str):
        return data
    prefix, body = data[:8], data[8:]
    if prefix == _UNICODE_PREFIX:
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            text = body.decode("utf-16", errors="replace")
        elif len(body) >= 2 and body[0] != 0 and body[1] == 0:
            text = body.decode("utf-16-le", errors="replace")
        else:
            text = body[: len(body) - len(body) % 2].decode("utf-16-be", errors="replace")
    elif prefix == _ASCII_PREFIX:
        text = body.decode("ascii", errors="replace")
    elif prefix == _JIS_PREFIX:
        text = body.decode("shift_jis", errors="replace")
    elif prefix == _UNDEFINED_PREFIX:
        text = body.decode("utf-8", errors="ignore")
    else:
        text = data.decode("utf-8", errors="ignore")
    return text.rstrip("\x00")


# ------------------------------------------------------------------------------------------------ reading

# NovelAI's sampler names, mapped the way A1111's sampler aliases map them; unknown ones become Euler a.
_NOVELAI_SAMPLERS = {
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2s_a": "DPM++ 2S a",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpm_fast": "DPM fast",
    "k_dpm_ad": "DPM adaptive",
    "ddim": "DDIM",
    "plms": "PLMS",
}


def _novelai_infotext(image: Image.Image, info: Mapping[str, object]) -> str | None:
    """Convert NovelAI's `Software`/`Description`/`Comment` metadata into an A1111 infotext, as A1111 does."""
    try:
        data = json.loads(str(info["Comment"]))
        sampler = _NOVELAI_SAMPLERS.get(str(data.get("sampler", "")).lower(), "Euler a")
        return (
            f"{info.get('Description', '')}\n"
            f"{NEGATIVE_PROMPT_PREFIX} {data['uc']}\n"
            f"Steps: {data['steps']}, Sampler: {sampler}, CFG scale: {data['scale']}, Seed: {data['seed']}, "
            f"Size: {image.width}x{image.height}, Clip skip: 2, ENSD: 31337"
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _infotext_from_image(image: Image.Image) -> str | None:
    """A1111's `read_info_from_image`: the `parameters` chunk, then EXIF UserComment or GIF/JPEG comment.

    As in A1111, a non-empty EXIF UserComment replaces the `parameters` text; without EXIF, a `comment`
    (GIF comment extension, JPEG COM marker) replaces it; NovelAI metadata is converted last.
    """
    info = image.info or {}
    text = info.get("parameters")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="ignore")
    if "exif" in info:
        try:
            comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
        except Exception:  # a damaged EXIF block must not hide the other metadata
            comment = None
        decoded = decode_user_comment(comment) if comment else ""
        if decoded:
            text = decoded
    elif "comment" in info:
        comment = info["comment"]
        text = comment.decode("utf-8", errors="ignore") if isinstance(comment, bytes) else str(comment)
    if info.get("Software") == "NovelAI":
        converted = _novelai_infotext(image, info)
        if converted is not None:
            text = converted
    return text or None


def read_infotext(source: str | Path | bytes | Image.Image) -> str | None:
    """The raw infotext stored in an image, or None if it has none.

    `source` is a path (str or Path), the bytes of an image file, or an open Pillow image. Looks where A1111
    writes: the PNG `parameters` text chunk (tEXt, zTXt or iTXt), the EXIF UserComment of JPEG/WEBP files
    (which wins when both exist, as in A1111), a GIF comment, and NovelAI's metadata. Feed the result to
    `parse_infotext`.

    Raises `ImageError` when the file is missing or is not an image Pillow can decode.
    """
    if isinstance(source, Image.Image):
        return _infotext_from_image(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = "the given image data"
        opener: Path | BinaryIO = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ImageError(f"cannot read infotext: there is no file at {label}; check the path")
        opener = path
    try:
        with Image.open(opener) as image:
            return _infotext_from_image(image)
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"cannot read infotext from {label}: it is not an image file Pillow can decode ({exc}); "
            "give a PNG, JPEG or WEBP image"
        ) from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(
            f"cannot read infotext from {label}: the image file is damaged or truncated ({exc}); "
            "use the original file"
        ) from exc


# ------------------------------------------------------------------------------------------------ writing

_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def _png_ready(image: Image.Image) -> Image.Image:
    """The image in a mode PNG can store losslessly (CMYK, float and other modes become RGB/RGBA)."""
    if image.mode in _PNG_MODES:
        return image
    return image.convert("RGBA" if "A" in image.getbands() else "RGB")


def _pnginfo(infotext: str | None) -> PngImagePlugin.PngInfo | None:
    """A `parameters` chunk: Pillow writes tEXt for latin-1 text and iTXt (UTF-8) otherwise."""
    if infotext is None:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return info


def png_bytes(image: Image.Image, infotext: str | None) -> bytes:
    """The image as lossless PNG bytes carrying `infotext` in its `parameters` chunk (none if None)."""
    buffer = io.BytesIO()
    _png_ready(image).save(buffer, format="PNG", pnginfo=_pnginfo(infotext))
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path, infotext: str | None) -> Path:
    """Save the image as PNG with `infotext` in its `parameters` chunk, and return the path.

    The file is written to a temporary name in the same folder and then renamed, so a crash or a full disk
    never leaves a half-written PNG under the final name. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(image, infotext)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
