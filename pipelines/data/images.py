"""The one image decoder, used alike by the training readers and by serving: encoded PNG/JPEG bytes
-> uint8 (C, H, W), exactly — no resizing and no change of the channel count (a palette image counts
as the RGB it decodes to). Pillow and numpy only, so serving does not pull in pyarrow."""
from __future__ import annotations

import io

import numpy as np

# Pillow modes -> channel counts; palette and 1-bit images count as what they decode to.
MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "LA": 2, "P": 3, "RGB": 3, "YCbCr": 3, "RGBA": 4,
                 "CMYK": 4}


class ImageError(ValueError):
    """Bytes that are not an image of the expected shape; the message names the row and what is wrong."""


def decode_image(data: bytes | bytearray | memoryview, shape: tuple[int, int, int], where: str,
                 owner: str = "the dataset") -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W) of exactly ``shape`` (what ``owner`` expects);
    :class:`ImageError` otherwise."""
    from PIL import Image, UnidentifiedImageError
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{where}: image must be encoded PNG/JPEG bytes, got {type(data).__name__}")
    C, H, W = shape
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            got_c = MODE_CHANNELS.get(mode, len(im.getbands()))
            if (h, w) != (H, W):
                raise ImageError(f"{where}: image is {w}x{h} pixels (width x height), {owner} expects {W}x{H}")
            if got_c != C:
                want = "grey (1 channel)" if C == 1 else f"{C} channels (RGB)" if C == 3 else f"{C} channels"
                raise ImageError(f"{where}: image has {got_c} channel(s) (mode {mode}), {owner} expects {want}")
            arr = np.asarray(im.convert("RGB" if C == 3 else "L"))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{where}: not a readable image ({len(bytes(data))} bytes; PNG or JPEG expected): {e}") from None
    return arr.transpose(2, 0, 1) if C == 3 else arr[None]
