"""Regenerate the schema appendix of `docs/bridge-protocol.md` from `sdcore_bridges.schemas`.

    python -m sdcore_bridges.docgen [path/to/bridge-protocol.md]

The appendix lies between the markers `<!-- schemas:begin -->` and `<!-- schemas:end -->`; everything else in
the file is prose and is left alone. `tests/test_bridge_protocol.py` fails when the two disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import schemas as S

BEGIN, END = "<!-- schemas:begin -->", "<!-- schemas:end -->"
GROUPS = (
    ("client", "Client → server text frames", S.CLIENT_MESSAGES),
    ("server", "Server → client text frames", S.SERVER_MESSAGES),
    ("reply", "`data` of the reply to each built-in method", S.REPLY_DATA),
    ("binary", "Binary frame headers", S.BINARY_HEADERS),
)


def render() -> str:
    out = [BEGIN, ""]
    for prefix, title, group in GROUPS:
        out += [f"### {title}", ""]
        for name, schema in group.items():
            out += [f"#### `{prefix}.{name}`", "", f"<!-- schema: {prefix}.{name} -->", "```json",
                    json.dumps(schema, indent=2, ensure_ascii=False), "```", ""]
    out.append(END)
    return "\n".join(out)


def update(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "docs" / "bridge-protocol.md"
    print(f"{target}: {'updated' if update(target) else 'up to date'}")
