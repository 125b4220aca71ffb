"""PNG encoding for responses, tuned for latency rather than size.

Pillow's encoder tries every row filter and compresses everything; on a 1024x1024 image that costs 20 ms for
a smooth picture and ~100 ms for a noisy one (zlib gains nothing there). Here rows are left unfiltered and a
sample decides whether zlib is worth running at all, so encoding never dominates serving overhead.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from rayxdit.request import VIDEO_MEDIA_TYPES, EncodedResult, GenerateResult

SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLE_ROWS = 64
WORTH_COMPRESSING = 0.9  # compressed/raw ratio of the sample below which zlib runs on the whole image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """An 8-bit RGB (or grayscale/RGBA) PNG of ``image`` that any decoder reads."""
    pixels = np.asarray(
        image.convert("RGB")
        if isinstance(image, Image.Image) and image.mode not in ("RGB", "RGBA", "L")
        else image
    )
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png takes 8-bit images, got {pixels.dtype}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 (None) per row
    rows[:, 1:] = pixels.reshape(height, -1)
    raw = rows.tobytes()
    sample = raw[: SAMPLE_ROWS * rows.shape[1]]
    level = 1 if len(zlib.compress(sample, 1)) < WORTH_COMPRESSING * len(sample) else 0
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, level))
        + _chunk(b"IEND", b"")
    )


def encode_result(result: GenerateResult) -> EncodedResult:
    """A result with its images as PNG bytes, to cross process boundaries (rank 0 to its caller)."""
    return EncodedResult(
        [encode_png(image) for image in result.images],
        result.latents,
        result.timings,
        result.frames_per_video,
    )


def encode_video(frames: list[bytes], video_format: str, fps: int) -> bytes:
    """One video from its frames as PNG bytes: ``mp4`` (H.264 through imageio's ffmpeg), ``png`` (an animated
    PNG: lossless) or ``gif``. CPU work of a fraction of a second per frame: run it off the event loop."""
    import tempfile

    if video_format not in VIDEO_MEDIA_TYPES:
        raise ValueError(f"format '{video_format}': one of {', '.join(VIDEO_MEDIA_TYPES)}")
    images = [Image.open(io.BytesIO(frame)) for frame in frames]
    with tempfile.TemporaryDirectory(prefix="rayxdit-video-") as folder:
        path = Path(folder) / f"video.{video_format}"
        save_video(images, path, fps)
        return path.read_bytes()


VIDEO_SUFFIXES = ("", ".png", ".apng", ".gif", ".mp4")
"""What :func:`save_video` writes; no suffix means a directory of frames."""


def check_video_path(path: Path) -> None:
    """Raise ``ValueError`` when :func:`save_video` cannot write ``path`` (check before generating)."""
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: a video goes to {', '.join(VIDEO_SUFFIXES[1:])} or a directory")


def save_video(frames: list[Image.Image], path: Path, fps: int = 16) -> list[Path]:
    """Write one video's frames: ``.png``/``.apng`` as an animated PNG (lossless, one file, plays in
    browsers), ``.gif``, ``.mp4`` (H.264, imageio's ffmpeg), or a directory of numbered PNG frames when
    ``path`` has no suffix. Returns the files written."""
    check_video_path(path)
    suffix = path.suffix.lower()
    if not suffix:
        path.mkdir(parents=True, exist_ok=True)
        written = [path / f"frame-{index:04d}.png" for index in range(len(frames))]
        for frame, target in zip(frames, written, strict=True):
            frame.save(target)
        return written
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".png", ".apng", ".gif"):
        frames[0].save(
            path,
            format="PNG" if suffix != ".gif" else "GIF",
            save_all=True,
            append_images=frames[1:],
            duration=round(1000 / fps),
            loop=0,
        )
        return [path]
    try:
        import imageio.v2 as imageio  # .mp4, the one suffix left
    except ImportError:
        raise ValueError(
            "writing .mp4 needs imageio[ffmpeg] (pip install 'imageio[ffmpeg]'); "
            "or write .png (animated) or a directory of frames"
        ) from None
    # macro_block_size 1: H.264 needs even sides only (every video model's sizes are), and imageio must not
    # rescale frames to multiples of 16.
    with imageio.get_writer(path, fps=fps, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame.convert("RGB")))
    return [path]


def terminal_thumbnail(png: bytes, columns: int = 48) -> str:
    """A PNG as lines of 24-bit-colour half blocks, at most ``columns`` wide: each character cell shows two
    pixels, one above the other (a cell is about twice as tall as wide, so the picture keeps its shape)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width = max(1, min(columns, image.width))
    height = max(2, 2 * round(image.height * width / image.width / 2))
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    lines = []
    for top, bottom in zip(pixels[0::2], pixels[1::2], strict=True):
        cells = (
            f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m\u2580"
            for a, b in zip(top.tolist(), bottom.tolist(), strict=True)
        )
        lines.append("".join(cells) + "\x1b[0m")
    return "\n".join(lines)
