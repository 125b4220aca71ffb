"""Input images (img2img sources, inpainting masks) checked where they arrive: the HTTP ingress, the CLI and
the batch job refuse what no rank could use, before any GPU work.

Imports PIL only inside its functions: the HTTP ingress imports this module and loads PIL with the first
upload it checks.
"""

from __future__ import annotations

import io
import re

from rayxdit.limits import ModelLimits
from rayxdit.request import RequestError

MAX_UPLOAD_BYTES = 20 << 20
"""Largest encoded input image accepted (a 4096x4096 PNG of a photo is about 30 MB; JPEG far less)."""
MAX_UPLOAD_PIXELS = 4096 * 4096
"""Largest input image accepted, in pixels: decoding is bounded before it starts."""


def inspect_image(
    data: bytes, param: str, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS
) -> tuple[int, int]:
    """``(width, height)`` of an encoded image, fully decoded once to prove it is one; :class:`RequestError`
    naming ``param`` when it is empty, too large, or not an image Pillow reads (PNG, JPEG, WebP...)."""
    if not data:
        raise RequestError(f"{param}: the file is empty", param)
    if len(data) > max_bytes:
        raise RequestError(f"{param}: {len(data)} bytes is more than the {max_bytes} accepted", param)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(
                    f"{param}: {width}x{height} is more than the {max_pixels} pixels accepted", param
                )
            image.load()
    except RequestError:
        raise
    except Image.DecompressionBombError as error:  # its header claims far more pixels than Pillow opens
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(claimed[1])} pixels" if claimed else "its size"
        raise RequestError(f"{param}: {size} is more than the {max_pixels} pixels accepted", param) from None
    except Exception:  # not an image, truncated
        raise RequestError(f"{param}: not an image this server reads (PNG, JPEG, WebP)", param) from None
    return width, height


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an image already checked by :func:`inspect_image`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def size_for(image_size: tuple[int, int], limits: ModelLimits) -> tuple[int, int]:
    """The output size of an edit that names none: the input image's, scaled down to fit the model's
    largest side and rounded down to its size multiple."""
    width, height = image_size
    scale = min(1.0, limits.max_side / max(width, height))
    multiple = limits.size_multiple
    fitted = [max(multiple, int(side * scale) // multiple * multiple) for side in (width, height)]
    return fitted[0], fitted[1]


def edit_size(
    image_size: tuple[int, int],
    mask_size: tuple[int, int] | None,
    width: int | None,
    height: int | None,
    limits: ModelLimits,
) -> tuple[int | None, int | None]:
    """An edit's output size: the one it names (``width``/``height``), else its image's, fitted to the model
    (:func:`size_for`); :class:`RequestError` when its mask does not cover the image."""
    if mask_size is not None:
        check_mask(mask_size, image_size)
    if width is not None or height is not None:
        return width, height
    return size_for(image_size, limits)


def check_mask(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """A mask must cover the image pixel for pixel (as OpenAI's edits API requires)."""
    if mask_size != image_size:
        raise RequestError(
            f"mask: {mask_size[0]}x{mask_size[1]} differs from the image's {image_size[0]}x{image_size[1]}",
            "mask",
        )
