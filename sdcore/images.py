"""Image inputs and the pixel-side of img2img and inpainting (masks, "only masked" crops, compositing).

Masks are white where the image is repainted and black where it is kept, as in A1111. The final composite
keeps every pixel where the (blurred) mask is 0 exactly as it was in the input.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_IMAGE_PIXELS = 8192 * 8192


def load_image(value: Any, *, what: str = "image") -> Image.Image:
    """Decode an image given as a PIL image, bytes, a file path, base64 or a data: URL."""
    if isinstance(value, Image.Image):
        image = value
    else:
        data = _image_bytes(value, what)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"The {what} is {image.width}x{image.height}, larger than sdcore accepts "
                    f"({MAX_IMAGE_PIXELS} pixels); scale it down first."
                )
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageError(
                f"The {what} could not be decoded as an image ({exc}). Send a PNG, JPEG or WEBP file."
            ) from None
    image = ImageOps.exif_transpose(image)
    return image


def _image_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Path):
        return _read_file(value, what)
    if not isinstance(value, str):
        raise ImageError(f"The {what} must be a path, base64 string, data URL or image, not {type(value).__name__}.")
    text = value.strip()
    if text.startswith("data:"):
        _, _, text = text.partition(",")
        return _b64(text, what)
    if len(text) < 1024 and ("/" in text or "\\" in text or "." in text[-6:]) and not text.startswith("iVBOR"):
        path = Path(text).expanduser()
        if path.exists():
            return _read_file(path, what)
        if len(text) < 260 and "." in text[-6:]:
            raise ImageError(f"The {what} file {text!r} does not exist.")
    return _b64(text, what)


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"The {what} file {path} cannot be read: {exc.strerror or exc}.") from None


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ImageError(f"The {what} is neither an existing file nor valid base64 image data.") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency over white (what a person sees in an editor)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """An "L" mask: an alpha channel if the image has one and it is not opaque, otherwise the luminance."""
    if image.mode in ("RGBA", "LA"):
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image.convert("L")


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def mask_bbox(mask: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of the mask's non-black pixels; None for an empty mask."""
    return mask.point(lambda v: 255 if v > 0 else 0).getbbox()


def crop_region(
    mask: Image.Image, padding: int, target_w: int, target_h: int
) -> tuple[int, int, int, int] | None:
    """A1111's "only masked" region: the mask's box plus `padding`, grown to the target's aspect ratio and
    kept inside the image."""
    box = mask_bbox(mask)
    if box is None:
        return None
    width, height = mask.size
    left, top, right, bottom = box
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, width), min(bottom + padding, height)
    ratio_crop = (right - left) / max(bottom - top, 1)
    ratio_target = target_w / target_h
    if ratio_crop > ratio_target:  # too wide: grow height
        want = (right - left) / ratio_target
        grow = want - (bottom - top)
        top, bottom = top - grow / 2, bottom + grow / 2
        if bottom > height:
            top, bottom = top - (bottom - height), height
        if top < 0:
            bottom, top = min(bottom - top, height), 0
    else:  # too tall: grow width
        want = (bottom - top) * ratio_target
        grow = want - (right - left)
        left, right = left - grow / 2, right + grow / 2
        if right > width:
            left, right = left - (right - width), width
        if left < 0:
            right, left = min(right - left, width), 0
    return int(round(left)), int(round(top)), int(round(right)), int(round(bottom))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": replace the masked area by colours smeared in from around it (repeated blurs)."""
    result = image.copy()
    keep = Image.eval(mask, lambda v: 255 - v)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        for _ in range(repeats):
            blurred = result.filter(ImageFilter.GaussianBlur(radius)) if radius else result
            # keep the known pixels, take the blurred colours only inside the mask
            result = Image.composite(image, blurred, keep.point(lambda v: 255 if v > 127 else 0))
    return result


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """`generated` where the mask is white, `original` where it is black, blended in between.

    Where the mask is 0 the original pixel is copied unchanged, bit for bit.
    """
    original = to_rgb(original)
    generated = generated.convert("RGB").resize(original.size, Image.Resampling.LANCZOS) \
        if generated.size != original.size else generated.convert("RGB")
    return Image.composite(generated, original, mask.convert("L"))


def pil_to_tensor(image: Image.Image) -> Any:
    """RGB image → float tensor [1, 3, H, W] in [-1, 1]."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def mask_to_tensor(mask: Image.Image) -> Any:
    """L mask → float tensor [1, 1, H, W] in [0, 1]."""
    import torch

    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None, None].contiguous()


def tensor_to_pil(images: Any) -> list[Image.Image]:
    """Float tensor [B, 3, H, W] in [-1, 1] → RGB images (rounded as diffusers does)."""
    array = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    array = (array * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def extend_canvas(
    image: Image.Image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0
) -> tuple[Image.Image, Image.Image]:
    """Outpainting helper: a bigger canvas with the image placed inside, and the mask of the new area.

    The new area is filled by `fill_masked` so img2img-style denoising starts from plausible colours.
    """
    if min(left, top, right, bottom) < 0:
        raise ImageError("Outpainting margins must be 0 or more pixels.")
    image = to_rgb(image)
    width, height = image.width + left + right, image.height + top + bottom
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image, (left, top))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return fill_masked(canvas, mask), mask
