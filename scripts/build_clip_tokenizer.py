"""Build sdcore's offline CLIP tokenizer files from the BPE merge list shipped in `open-clip-torch`.

Writes `sdcore/data/clip/vocab.json` and `sdcore/data/clip/merges.txt`, the two files a Hugging Face
`CLIPTokenizer` needs. The vocabulary is derived from the merge list exactly as CLIP's own `SimpleTokenizer`
derives it: 256 byte symbols, the same 256 with `</w>`, one entry per merge (the first 48 894 merges), then the
two special tokens, 49 408 ids in all.

`open_clip` is located with `importlib.util.find_spec` and never imported (importing it pulls in torch, timm
and torchvision). Usage:

    python scripts/build_clip_tokenizer.py            # writes into sdcore/data/clip/
    python scripts/build_clip_tokenizer.py --check    # exit 1 if the shipped files differ from a fresh build
    python scripts/build_clip_tokenizer.py --out DIR  # writes into DIR
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# The merge list CLIP uses: vocabulary size minus 256 byte symbols, minus their 256 "</w>" forms, minus 2 specials.
NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "sdcore" / "data" / "clip"


def find_bpe_file() -> Path:
    """The BPE merge file inside the installed open-clip-torch distribution (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open-clip-torch is not installed; install it with `pip install --no-deps open-clip-torch` "
            "(only its BPE data file is used)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the open-clip-torch installation.")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) table from each byte to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def build(bpe_path: Path) -> tuple[str, str]:
    """The text of `vocab.json` and `merges.txt` derived from the gzipped BPE merge list."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like CLIP's BPE merge list.")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise ValueError(f"derived vocabulary has {len(vocab)} entries ({len(set(vocab))} distinct), not {VOCAB_SIZE}")
    vocab_text = json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False) + "\n"
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_text, merges_text


def write(out_dir: Path, bpe_path: Path | None = None) -> list[Path]:
    vocab_text, merges_text = build(bpe_path or find_bpe_file())
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(vocab_text, encoding="utf-8")
    merges_file.write_text(merges_text, encoding="utf-8")
    return [vocab_file, merges_file]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="output folder (default: sdcore/data/clip)")
    parser.add_argument("--check", action="store_true", help="compare the files in --out with a fresh build")
    args = parser.parse_args(argv)
    if args.check:
        vocab_text, merges_text = build(find_bpe_file())
        same = (args.out / "vocab.json").read_text(encoding="utf-8") == vocab_text and (
            args.out / "merges.txt"
        ).read_text(encoding="utf-8") == merges_text
        print("up to date" if same else f"{args.out} differs from a fresh build; rerun without --check")
        return 0 if same else 1
    for path in write(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
