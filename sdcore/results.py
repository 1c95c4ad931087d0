"""What a finished job gives back: the images and the exact parameters that made each one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from .requests import GenerationRequest


@dataclass
class GenerationResult:
    """Images in order (batch by batch), with the seed and A1111 infotext of each.

    `request` is the request as run: random seeds replaced by the seed actually used, so
    `engine.generate(result.request)` makes the same images again.
    """

    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    model_name: str = ""
    model_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def file_name(self, index: int) -> str:
        return f"{index:05d}-{self.seeds[index]}.png"

    def save(self, directory: str | Path, *, start_index: int | None = None) -> list[Path]:
        """Write every image as a PNG carrying its infotext; file names hold the index and the seed.

        Numbering continues after the highest index already in `directory`, so runs never overwrite.
        """
        from .infotext import save_png

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if start_index is None:
            start_index = _next_index(out)
        paths = []
        for i, (image, seed, text) in enumerate(zip(self.images, self.seeds, self.infotexts, strict=True)):
            path = out / f"{start_index + i:05d}-{seed}.png"
            paths.append(save_png(image, path, text))
        return paths


def _next_index(directory: Path) -> int:
    highest = -1
    for path in directory.glob("*.png"):
        head = path.stem.split("-", 1)[0]
        if head.isdigit():
            highest = max(highest, int(head))
    return highest + 1
