import io

import numpy as np
import pytest
from PIL import Image

from rayxdit.imaging import encode_png


@pytest.mark.parametrize("kind", ["noise", "smooth", "gray", "rgba"])
def test_png_decodes_to_the_same_pixels(kind):
    rng = np.random.default_rng(0)
    pixels = {
        "noise": rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
        "smooth": (np.add.outer(np.arange(40), np.arange(60))[..., None] * np.array([1, 2, 3]) % 256).astype(
            np.uint8
        ),
        "gray": rng.integers(0, 256, (16, 9), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (8, 8, 4), dtype=np.uint8),
    }[kind]
    data = encode_png(Image.fromarray(pixels))
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert np.array_equal(np.asarray(decoded), pixels)


def test_smooth_images_are_compressed_noise_is_stored():
    rng = np.random.default_rng(1)
    smooth = np.zeros((256, 256, 3), dtype=np.uint8)
    noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert len(encode_png(smooth)) < smooth.nbytes / 20
    assert len(encode_png(noise)) > noise.nbytes
