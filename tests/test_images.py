"""Image inputs and inpainting geometry."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sdcore import images
from sdcore.errors import ImageError


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_from_every_form(tmp_path):
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    data = png_bytes(image)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for value in (image, data, str(path), path, b64, "data:image/png;base64," + b64):
        loaded = images.load_image(value)
        assert loaded.size == (16, 8) and loaded.convert("RGB").getpixel((3, 3)) == (10, 20, 30)


@pytest.mark.parametrize("value,message", [
    (b"not an image", "could not be decoded as an image"),
    ("missing.png", "file 'missing.png' does not exist"),
    (12, "must be a path, base64 string, data URL or image, not int"),
])
def test_undecodable_images(value, message):
    with pytest.raises(ImageError, match=message):
        images.load_image(value)


def test_crop_region_pads_and_matches_aspect_ratio():
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (90, 40, 110, 60))  # 20x20 square
    left, top, right, bottom = images.crop_region(mask, padding=10, target_w=64, target_h=32)
    assert (right - left) / (bottom - top) == pytest.approx(2.0, abs=0.05)
    assert left <= 80 and right >= 120 and top <= 30 and bottom >= 70
    assert 0 <= left and right <= 200 and 0 <= top and bottom <= 100


def test_crop_region_stays_inside_at_the_border():
    mask = Image.new("L", (100, 100), 0)
    mask.paste(255, (0, 0, 10, 10))
    assert images.crop_region(mask, padding=32, target_w=64, target_h=64) == (0, 0, 42, 42)


def test_composite_keeps_unmasked_pixels_exactly():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    generated = Image.new("RGB", (32, 32), (255, 0, 0))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = np.asarray(images.composite(original, generated, images.blur_mask(mask, 2)))
    blurred = np.asarray(images.blur_mask(mask, 2))
    keep = blurred == 0
    assert keep.sum() > 300
    assert np.array_equal(out[keep], np.asarray(original)[keep])
    centre = out[13:19, 13:19].astype(int)
    assert (centre[..., 0] >= 250).all() and (centre[..., 1:] <= 5).all()


def test_mask_from_alpha_channel():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    mask = images.to_mask(rgba)
    assert mask.getpixel((1, 1)) == 255 and mask.getpixel((0, 0)) == 0


def test_extend_canvas_for_outpainting():
    image = Image.new("RGB", (16, 16), (0, 200, 0))
    canvas, mask = images.extend_canvas(image, left=8, right=8)
    assert canvas.size == (32, 16) and mask.size == (32, 16)
    assert mask.getpixel((0, 5)) == 255 and mask.getpixel((8, 5)) == 0 and mask.getpixel((24, 5)) == 255
    assert canvas.getpixel((10, 5)) == (0, 200, 0)
    # the new area is filled with the image's colours, not black
    assert canvas.getpixel((2, 5))[1] > 150
