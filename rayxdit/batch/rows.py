"""Input rows: reading (parquet, jsonl, csv), stable ids and seeds, and validation before any GPU work.

Pure functions over plain dicts so that they run the same in the driver, in Ray Data tasks and in tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rayxdit.limits import ModelLimits
from rayxdit.request import GenerateRequest, RequestError, pair_controls

LATER_COLUMNS = (
    "frames",
    "image",
    "mask",
    "strength",
    "control_image",
    "controlnet",
    "controlnet_scale",
    "ip_adapter_image",
    "ip_adapter_scale",
    "scheduler",
    "loras",
)
"""Columns added after the first release: left out of a row's digest when empty, so ids stay stable."""
INPUT_COLUMNS = (
    "id",
    "prompt",
    "negative_prompt",
    "seed",
    "size",
    "steps",
    "guidance",
    "true_cfg_scale",
    *LATER_COLUMNS,
)
RECORDED_COLUMNS = tuple(name for name in INPUT_COLUMNS if name not in ("guidance", "true_cfg_scale"))
"""The input columns a manifest records (guidance and the CFG scale live in the row's request)."""
SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
URL_TIMEOUT_S = 30.0
"""How long an ``image`` URL may take to fetch."""

STATUS_OK, STATUS_FAILED, STATUS_INVALID = "ok", "failed", "invalid"
"""``failed``: generation failed at run time (retried when the job is rerun); ``invalid``: the row itself
is wrong (empty prompt, bad size): rerunning cannot help, so it is not retried."""


def input_format(path: str) -> str:
    for suffix, kind in ((".parquet", "parquet"), (".jsonl", "json"), (".json", "json"), (".csv", "csv")):
        if path.rstrip("/").lower().endswith(suffix):
            return kind
    raise ValueError(f"{path}: input must end in .parquet, .jsonl or .csv")


def _clean(value: Any) -> Any:
    """Missing values come as None, NaN or "" depending on the format: make them all None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


def row_id(row: dict[str, Any]) -> str:
    """The row's own ``id`` when it has one, else a digest of its content: stable across reruns and input
    order, and identical rows (which would make identical images) share it, so they are generated once."""
    given = _clean(row.get("id"))
    if given is not None and str(given) != "":
        return str(given)
    # Columns a row leaves out stay out of the digest: ids of rows written before a column existed hold.
    fields = {key: _clean(row.get(key)) for key in INPUT_COLUMNS if key != "id"}
    for key in LATER_COLUMNS:
        if fields[key] is None:
            del fields[key]
    content = json.dumps(fields, sort_keys=True, default=str)
    return "row-" + hashlib.sha256(content.encode()).hexdigest()[:20]


def seed_for(identifier: str) -> int:
    """A row without a seed gets one derived from its id, so a rerun reproduces its image."""
    return int.from_bytes(hashlib.sha256(identifier.encode()).digest()[:8], "big") % (2**31)


def file_stem(identifier: str) -> str:
    """A file name for the id: the id itself when it is safe, else a readable prefix plus a digest."""
    if SAFE_ID.match(identifier):
        return identifier
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", identifier)[:60]
    return f"{prefix}-{hashlib.sha256(identifier.encode()).hexdigest()[:12]}"


def read_input_image(location: str, base_dir: Path | None, param: str) -> bytes:
    """An ``image``/``mask``/``control_image``/``ip_adapter_image`` cell's bytes: an http(s) URL, or a path relative to the input file's directory
    (never outside it); checked as the HTTP API checks uploads."""
    from rayxdit.uploads import MAX_UPLOAD_BYTES, inspect_image

    if location.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(location, timeout=URL_TIMEOUT_S) as response:
                data = response.read(MAX_UPLOAD_BYTES + 1)
        except Exception as error:
            raise RequestError(f"{param}: {location} could not be fetched ({error})", param) from None
    else:
        if base_dir is None:
            raise RequestError(f"{param}: a path needs an input file on a local or mounted disk", param)
        root = base_dir.resolve()
        path = (root / location).resolve()
        if not path.is_relative_to(root):
            raise RequestError(f"{param}: {location} is outside the input's directory {root}", param)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise RequestError(f"{param}: {location}: {error.strerror}", param) from None
    inspect_image(data, param)
    return data


def normalize(
    row: dict[str, Any],
    limits: ModelLimits,
    base_dir: Path | None = None,
    controlnets: tuple[str, ...] = (),
    ip_adapter: bool = False,
) -> dict[str, Any]:
    """A row with its id and seed filled in, and ``status``/``error`` set to ``invalid`` with the reason
    when the row cannot be generated. ``request`` holds the validated request as JSON otherwise (with
    the row's input images, read from ``base_dir`` or their URLs). ``controlnets`` and ``ip_adapter``: what
    the job's model loads beside it (a row's ``controlnet`` must name one of them)."""
    identifier = row_id(row)
    seed = _clean(row.get("seed"))
    out = {
        "id": identifier,
        "prompt": _clean(row.get("prompt")),
        "negative_prompt": _clean(row.get("negative_prompt")),
        "seed": int(seed) if seed is not None else seed_for(identifier),
        "size": _clean(row.get("size")),
        "steps": _clean(row.get("steps")),
        "frames": _clean(row.get("frames")),
        "image": _clean(row.get("image")),
        "mask": _clean(row.get("mask")),
        "strength": _clean(row.get("strength")),
        **{key: _clean(row.get(key)) for key in INPUT_COLUMNS[INPUT_COLUMNS.index("control_image") :]},
        "status": None,
        "error": None,
        "request": None,
    }
    if out["loras"] is not None and not isinstance(out["loras"], str):  # a parquet list of structs
        out["loras"] = json.dumps([dict(item) for item in out["loras"]], default=float)
    try:
        request = to_request(out, row, limits, base_dir, controlnets, ip_adapter)
        resolved = limits.resolve(request)
    except RequestError as error:
        out.update(status=STATUS_INVALID, error=str(error))
        return out
    out.update(
        size=f"{resolved.width}x{resolved.height}",
        steps=resolved.steps,
        frames=resolved.frames if limits.makes_video else None,
        request=request.model_dump_json(),
    )
    return out


def adapter_inputs(
    out: dict[str, Any], base_dir: Path | None, controlnets: tuple[str, ...], ip_adapter: bool
) -> dict[str, Any]:
    """The request fields of the row's ControlNet input (``control_image``, read like ``image``;
    ``controlnet``, ``controlnet_scale``) and IP-Adapter image prompt (``ip_adapter_image``,
    ``ip_adapter_scale``)."""
    update: dict[str, Any] = {}
    if out["control_image"] is not None or out["controlnet"] is not None:
        images = []
        if out["control_image"] is not None:
            images = [read_input_image(str(out["control_image"]), base_dir, "control_image")]
        update["controls"] = pair_controls(
            images,
            [] if out["controlnet"] is None else [str(out["controlnet"])],
            [] if out["controlnet_scale"] is None else [_number(out["controlnet_scale"], "controlnet_scale")],
            [],
            controlnets,
        )
    if out["ip_adapter_image"] is not None:
        if not ip_adapter:
            raise RequestError(
                "ip_adapter_image: this job loads no IP-Adapter (--ip-adapter)", "ip_adapter_image"
            )
        update["ip_adapter_image"] = read_input_image(
            str(out["ip_adapter_image"]), base_dir, "ip_adapter_image"
        )
        scale = out["ip_adapter_scale"]
        update["ip_adapter_scale"] = 1.0 if scale is None else _number(scale, "ip_adapter_scale")
    return update


def parse_loras(cell: Any) -> tuple[dict[str, Any], ...]:
    """A row's ``loras`` cell as the request's list: JSON as the HTTP API takes it (``[{"name": "ink",
    "scale": 0.8}]``) or, friendlier in a CSV, ``ink:0.8,styles/sketch`` (no scale: 1)."""
    if cell is None:
        return ()
    text = str(cell).strip()
    if text.startswith("["):
        try:
            chosen = json.loads(text)
        except ValueError as error:
            raise RequestError(f"loras: {text[:60]!r} is not JSON ({error})", "loras") from None
        if not isinstance(chosen, list):
            raise RequestError("loras: a JSON list of {name, scale}", "loras")
        return tuple(chosen)
    chosen = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        name, sep, scale = part.rpartition(":")
        chosen.append({"name": name, "scale": _number(scale, "loras")} if sep else {"name": part})
    return tuple(chosen)


def _number(value: Any, param: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{param}: {value!r} is not a number", param) from None


def to_request(
    out: dict[str, Any],
    row: dict[str, Any],
    limits: ModelLimits,
    base_dir: Path | None = None,
    controlnets: tuple[str, ...] = (),
    ip_adapter: bool = False,
) -> GenerateRequest:
    from rayxdit.uploads import edit_size, image_size

    prompt = out["prompt"]
    if prompt is None or not str(prompt).strip():
        raise RequestError("prompt is empty", "prompt")
    image = mask = None
    if out["image"] is not None:
        image = read_input_image(str(out["image"]), base_dir, "image")
    if out["mask"] is not None:
        if image is None:
            raise RequestError("mask: an inpainting mask needs an image", "mask")
        mask = read_input_image(str(out["mask"]), base_dir, "mask")
    width = height = None
    if out["size"] is not None:
        match = SIZE.match(str(out["size"]))
        if not match:
            raise RequestError(f"size {out['size']!r} is not WIDTHxHEIGHT", "size")
        width, height = int(match.group(1)), int(match.group(2))
    if image is not None:  # an edit takes its image's size, as over HTTP; its mask must cover the image
        mask_size = None if mask is None else image_size(mask)
        width, height = edit_size(image_size(image), mask_size, width, height, limits)
    inputs = adapter_inputs(out, base_dir, controlnets, ip_adapter)
    loras = parse_loras(out["loras"])
    try:
        return GenerateRequest(
            prompt=str(prompt),
            negative_prompt=None if out["negative_prompt"] is None else str(out["negative_prompt"]),
            width=width,
            height=height,
            steps=None if out["steps"] is None else int(out["steps"]),
            scheduler=None if out["scheduler"] is None else str(out["scheduler"]),
            seed=out["seed"],
            guidance=None if _clean(row.get("guidance")) is None else float(row["guidance"]),
            true_cfg_scale=float(_clean(row.get("true_cfg_scale")) or 1.0),
            num_frames=None if out["frames"] is None else int(out["frames"]),
            image=image,
            mask=mask,
            strength=0.6 if out["strength"] is None else float(out["strength"]),
            loras=loras,
            **inputs,
        )
    except (ValidationError, ValueError) as error:
        first = (
            error.errors()[0] if isinstance(error, ValidationError) else {"loc": ("row",), "msg": str(error)}
        )
        field = str(first["loc"][0]) if first.get("loc") else "row"
        raise RequestError(f"{field}: {first['msg']}", field) from None
