"""The offline CLIP tokenizer: exact CLIP ids, padding per family, and the shipped files equal a fresh build."""

import importlib.util
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdcore.tokenizers import BOS_ID, DATA_DIR, EOS_ID, clip_tokenizer, save_clip_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a photo of a cat",
    "(masterpiece:1.2), best quality, [cat|dog], ((red hair)), [blue:green:0.5] BREAK 1girl",
    "<lora:detail_tweaker:0.8> a \\(escaped\\) bracket, embedding:EasyNegative, score_9, it's what we'll do",
    "Café crème brûlée, ÉTÉ, naïve Zürich",
    "日本語のテキスト、中文字符 and 한국어 🐱🚀 emoji ✨",
    "   lots\tof \n\n whitespace    and UPPER case   ",
    "numbers 1234567 and 3.14159, hyphen-ated words_with_underscores!!!",
]


# A direct port of CLIP's BPE (openai/CLIP simple_tokenizer.py, MIT) as an independent reference, minus ftfy
# (the prompts above are already NFC-normalised, which is all ftfy would change).
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def _reference_tables():
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (DATA_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m)}
    return vocab, ranks


def _bpe(token, ranks):
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


def reference_encode(text):
    import regex

    vocab, ranks = _reference_tables()
    byte_encoder = _bytes_to_unicode()
    text = " ".join(unicodedata.normalize("NFC", text).split()).strip().lower()
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    ids = []
    for token in regex.findall(pattern, text):
        token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
        ids.extend(vocab[piece] for piece in _bpe(token, ranks))
    return ids


def test_known_clip_ids():
    tok = clip_tokenizer()
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("dog", add_special_tokens=False)["input_ids"] == [1929]
    assert tok(",", add_special_tokens=False)["input_ids"] == [267]
    assert tok("masterpiece", add_special_tokens=False)["input_ids"] == [12066]
    assert tok.convert_ids_to_tokens([BOS_ID, EOS_ID, 0]) == ["<|startoftext|>", "<|endoftext|>", "!"]
    assert len(tok) == 49408


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_clip_bpe_reference(prompt):
    ids = clip_tokenizer()(prompt, add_special_tokens=False, truncation=False)["input_ids"]
    assert ids == reference_encode(prompt)
    assert ids  # every prompt here tokenises to something


def test_a1111_syntax_is_plain_text_to_the_tokenizer():
    tok = clip_tokenizer()
    ids = tok("(red:1.3)", add_special_tokens=False)["input_ids"]
    # "(", "red", ":", "1", ".", "3", ")": digits are single tokens, punctuation runs merge where CLIP merges them
    assert tok.convert_ids_to_tokens(ids) == ["(</w>", "red</w>", ":</w>", "1</w>", ".</w>", "3</w>", ")</w>"]


def test_padding_per_family_and_max_length():
    sd1 = clip_tokenizer()
    sd2 = clip_tokenizer("!")
    assert sd1.model_max_length == sd2.model_max_length == 77
    a = sd1("a cat", padding="max_length", max_length=77)["input_ids"]
    b = sd2("a cat", padding="max_length", max_length=77)["input_ids"]
    assert a[:4] == b[:4] == [49406, 320, 2368, 49407]
    assert set(a[4:]) == {49407} and set(b[4:]) == {0} and len(a) == len(b) == 77
    assert sd1.pad_token_id == 49407 and sd2.pad_token_id == 0


def test_cached_per_pad_token_and_long_prompts_not_truncated():
    assert clip_tokenizer() is clip_tokenizer("<|endoftext|>")
    assert clip_tokenizer("!") is not clip_tokenizer()
    long = ", ".join(["a very long prompt"] * 40)
    assert len(clip_tokenizer()(long, add_special_tokens=False, truncation=False)["input_ids"]) > 150
    with pytest.raises(ValueError):
        clip_tokenizer("<pad>")


def test_saved_tokenizer_folder_loads_with_transformers(tmp_path):
    from transformers import CLIPTokenizer

    folder = save_clip_tokenizer(tmp_path / "tokenizer", pad_token="!")
    loaded = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    for prompt in PROMPTS:
        assert loaded(prompt)["input_ids"] == clip_tokenizer("!")(prompt)["input_ids"]
    assert loaded.pad_token == "!" and loaded.model_max_length == 77


def _build_script():
    spec = importlib.util.spec_from_file_location("build_clip_tokenizer", ROOT / "scripts" / "build_clip_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="open-clip-torch is not installed, so the BPE source file cannot be read "
    "(pip install --no-deps open-clip-torch)",
)
def test_shipped_files_equal_a_fresh_build_from_open_clip(tmp_path):
    script = _build_script()
    written = script.write(tmp_path)
    for path in written:
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), f"{path.name} is stale: rerun the script"
    assert script.main(["--check"]) == 0
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
