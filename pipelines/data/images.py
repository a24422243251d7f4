"""The one image decoder, used alike by the training readers and by serving: encoded PNG/JPEG bytes
-> uint8 (C, H, W), exactly — no resizing and no change of the channel count (a palette image counts
as the RGB it decodes to). Pillow and numpy only, so serving does not pull in pyarrow."""
from __future__ import annotations

import io

import numpy as np

# The one rule for image modes, applied alike at ingest, in training and in serving: an image is 8-bit
# grey or 8-bit RGB, and decodes to exactly those values. Bilevel ("1": 0/255), palette ("P", without
# transparency) and JPEG's YCbCr decode exactly to grey / RGB. Everything else is refused, never
# converted: 16- and 32-bit images (a conversion would clip or rescale), alpha channels (dropping one
# changes what the pixels mean), CMYK.
EXACT_MODES = {"1": 1, "L": 1, "P": 3, "RGB": 3, "YCbCr": 3}
_HOW = {"I;16": "a 16-bit image", "I;16B": "a 16-bit image", "I;16L": "a 16-bit image", "I;16N": "a 16-bit image",
        "I": "a 32-bit integer image", "F": "a 32-bit float image", "LA": "grey with an alpha channel",
        "La": "grey with an alpha channel", "PA": "a palette image with alpha", "RGBA": "RGB with an alpha channel",
        "RGBa": "RGB with an alpha channel", "CMYK": "a CMYK image", "LAB": "a Lab image", "HSV": "an HSV image"}


class ImageError(ValueError):
    """Bytes that are not an image of the expected shape; the message names the row and what is wrong."""


def image_channels(im, where: str) -> int:
    """The channel count an opened Pillow image decodes to under the one rule; ImageError if its mode
    is not one this project reads exactly."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        raise ImageError(f"{where}: a palette image with transparency; 8-bit grey or RGB without alpha expected "
                         "(flatten it first: nothing is converted silently)")
    if mode not in EXACT_MODES:
        what = _HOW.get(mode, f"an image of mode {mode}")
        raise ImageError(f"{where}: {what} (mode {mode}); 8-bit grey or RGB expected (convert it first: nothing is "
                         "converted, clipped or rescaled silently)")
    return EXACT_MODES[mode]


def decode_image(data: bytes | bytearray | memoryview, shape: tuple[int, int, int], where: str,
                 owner: str = "the dataset") -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W) of exactly ``shape`` (what ``owner`` expects);
    :class:`ImageError` otherwise. Size and mode are checked from the header, before any pixel is
    decoded (a small file may declare a huge image)."""
    from PIL import Image, UnidentifiedImageError
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{where}: image must be encoded PNG/JPEG bytes, got {type(data).__name__}")
    C, H, W = shape
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            w, h = im.size
            if (h, w) != (H, W):
                raise ImageError(f"{where}: image is {w}x{h} pixels (width x height), {owner} expects {W}x{H}")
            got_c = image_channels(im, where)
            if got_c != C:
                want = "grey (1 channel)" if C == 1 else f"{C} channels (RGB)" if C == 3 else f"{C} channels"
                raise ImageError(f"{where}: image has {got_c} channel(s) (mode {im.mode}), {owner} expects {want}")
            im.load()
            arr = np.asarray(im.convert("RGB" if C == 3 else "L"))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: not a readable image ({len(bytes(data))} bytes; PNG or JPEG expected): {e}") from None
    return arr.transpose(2, 0, 1) if C == 3 else arr[None]
