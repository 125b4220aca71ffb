"""Input rows with images (img2img, inpainting): read from the input's directory, checked before any GPU
work, the size taken from the image when the row gives none."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rayxdit.batch.rows import normalize, row_id
from rayxdit.limits import ModelLimits
from rayxdit.request import ControlInput, GenerateRequest

FLUX = ModelLimits(image_inputs=True)


def write_png(path, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_an_image_row_carries_its_image_and_takes_its_size(tmp_path):
    source = write_png(tmp_path / "in" / "cat.png", 72, 40)
    mask = write_png(tmp_path / "in" / "cat-mask.png", 72, 40)
    row = normalize(
        {"prompt": "a cat", "image": "in/cat.png", "mask": "in/cat-mask.png", "strength": 0.8}, FLUX, tmp_path
    )
    assert row["status"] is None, row["error"]
    request = GenerateRequest.model_validate_json(row["request"])  # base64 in JSON, bytes again here
    assert (request.image, request.mask, request.strength) == (source, mask, 0.8)
    assert row["size"] == "64x32", "the image's size, rounded down to the model's multiple of 16"


def test_bad_image_rows_are_invalid_with_the_reason(tmp_path):
    write_png(tmp_path / "cat.png", 64, 32)
    write_png(tmp_path / "small-mask.png", 32, 32)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "cat.png").read_bytes())
    cases = {
        "../outside.png": "outside the input's directory",
        "missing.png": "No such file",
        "notes.png": "not an image",
    }
    for location, reason in cases.items():
        row = normalize({"prompt": "x", "image": location}, FLUX, tmp_path)
        assert row["status"] == "invalid" and reason in row["error"], (location, row["error"])
    mismatched = normalize({"prompt": "x", "image": "cat.png", "mask": "small-mask.png"}, FLUX, tmp_path)
    assert mismatched["status"] == "invalid" and "differs from the image" in mismatched["error"]
    video = ModelLimits(max_frames=81, frame_multiple=4)  # a model without image inputs
    refused = normalize({"prompt": "x", "image": "cat.png"}, video, tmp_path)
    assert refused["status"] == "invalid" and "takes no input images" in refused["error"]


def test_rows_without_the_new_columns_keep_their_ids():
    """Ids are digests of the row: columns added later (frames, image, mask, strength) stay out of it when
    empty, so outputs written by earlier versions are still found."""
    assert row_id({"prompt": "a cat", "seed": 1}) == row_id({"prompt": "a cat", "seed": 1, "image": None})
    assert row_id({"prompt": "a cat"}) != row_id({"prompt": "a cat", "image": "cat.png"})


def test_control_and_image_prompt_columns_become_the_requests_inputs(tmp_path):
    edges = write_png(tmp_path / "edges.png", 40, 40)
    face = write_png(tmp_path / "face.png", 24, 24)
    row = normalize(
        {
            "prompt": "a house",
            "control_image": "edges.png",
            "controlnet_scale": 0.5,
            "ip_adapter_image": "face.png",
        },
        FLUX,
        tmp_path,
        controlnets=("canny",),
        ip_adapter=True,
    )
    assert row["status"] is None, row["error"]
    request = GenerateRequest.model_validate_json(row["request"])
    assert request.controls == (ControlInput(image=edges, controlnet="canny", scale=0.5),)
    assert (request.ip_adapter_image, request.ip_adapter_scale) == (face, 1.0)
    cases = [
        ({"control_image": "edges.png"}, (), False, "without ControlNets"),
        ({"control_image": "edges.png", "controlnet": "depth"}, ("canny",), False, "not loaded by"),
        ({"controlnet": "canny"}, ("canny",), False, "send a control_image"),
        ({"control_image": "edges.png", "controlnet_scale": 9}, ("canny",), False, "outside 0..4"),
        ({"ip_adapter_image": "face.png"}, (), False, "no IP-Adapter"),
        ({"control_image": "edges.png", "controlnet_scale": "strong"}, ("canny",), False, "not a number"),
    ]
    for fields, nets, ip_adapter, reason in cases:
        bad = normalize({"prompt": "x", **fields}, FLUX, tmp_path, controlnets=nets, ip_adapter=ip_adapter)
        assert bad["status"] == "invalid" and reason in bad["error"], (fields, bad["error"])


def test_a_loras_column_becomes_the_requests_adapters_in_json_or_csv_form():
    cells = {
        '[{"name": "ink", "scale": 0.8}, {"name": "styles/sketch"}]': (("ink", 0.8), ("styles/sketch", 1.0)),
        "ink:0.8, styles/sketch": (("ink", 0.8), ("styles/sketch", 1.0)),
        "ink:-1.5": (("ink", -1.5),),
    }
    for cell, expected in cells.items():
        row = normalize({"prompt": "a cat", "loras": cell}, FLUX)
        assert row["status"] is None, row["error"]
        request = GenerateRequest.model_validate_json(row["request"])
        assert tuple((lora.name, lora.scale) for lora in request.loras) == expected
    listed = normalize({"prompt": "a cat", "loras": [{"name": "ink", "scale": 0.5}]}, FLUX)  # parquet structs
    assert listed["status"] is None and listed["loras"] == '[{"name": "ink", "scale": 0.5}]', listed
    for cell in ("../ink", "ink:lots", "[{", "a,b,c,d,e", "ink,ink", '{"name": "ink"}'):
        row = normalize({"prompt": "a cat", "loras": cell}, FLUX)
        assert row["status"] == "invalid" and row["error"].startswith("loras"), (cell, row["error"])
    assert row_id({"prompt": "a cat"}) == row_id({"prompt": "a cat", "loras": None})
