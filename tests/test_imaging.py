import io

import numpy as np
import pytest
from PIL import Image

from rayxdit.imaging import encode_png, terminal_thumbnail


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


def test_a_terminal_thumbnail_shows_two_pixels_a_cell_in_their_colours():
    """Top half red, bottom half blue, 80x40: 20 cells wide, 5 rows (the shape kept), red over red on the
    first rows and blue over blue on the last."""
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:20, :, 0] = 255
    pixels[20:, :, 2] = 255
    lines = terminal_thumbnail(encode_png(pixels), columns=20).split("\n")
    assert len(lines) == 5 and all(line.count("\u2580") == 20 and line.endswith("\x1b[0m") for line in lines)
    assert lines[0].startswith("\x1b[38;2;255;0;0m\x1b[48;2;255;0;0m")
    assert lines[-1].startswith("\x1b[38;2;0;0;255m\x1b[48;2;0;0;255m")
