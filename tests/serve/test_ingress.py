"""The HTTP ingress alone, over real HTTP (uvicorn on a local port), without Ray: everything it refuses, it
refuses before any pool is reached. The ingress here has no dispatcher and no state, so a request that got
past validation would fail with a 500, not the 4xx these tests expect."""

from __future__ import annotations

import base64
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import uvicorn

from rayxdit.config import PoolConfig, RouterConfig, ServeConfig
from rayxdit.serve.app import model_cards
from rayxdit.serve.catalog import Catalog
from rayxdit.serve.router import Ingress, build_ingress_app
from tests.helpers import free_port, left_half_mask, random_png


def _adapter_files() -> str:
    """A LoRA source as the ingress sees one: it only looks whether a name's file is there."""
    root = Path(tempfile.mkdtemp(prefix="rayxdit-ingress-loras-"))
    (root / "styles").mkdir()
    for name in ("ink.safetensors", "styles/sketch.safetensors", "notes.txt"):
        (root / name).write_bytes(b"")
    return str(root)


LORA_SOURCE = _adapter_files()
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
COMMON = dict(model="tiny-flux", accelerator="cpu", cpus_per_rank=0.25)
CONFIG = ServeConfig(
    pools=[
        PoolConfig(
            name="tiny-2",
            model_name="tiny-2",
            parallel="ulysses=2",
            controlnets=["tiny-flux-controlnet"],
            ip_adapter="tiny-flux-ip-adapter",
            lora_sources=[LORA_SOURCE],
            **COMMON,
        ),
        PoolConfig(name="tiny-4", model_name="tiny-4", parallel="ulysses=2,ring=2", **COMMON),
        PoolConfig(name="wan-2", model="tiny-wan", parallel="ulysses=2", accelerator="cpu"),
    ],
    router=RouterConfig(api_keys=[KEY]),
    elastic=None,
)


@contextlib.contextmanager
def ingress_alone(config: ServeConfig) -> Iterator[str]:
    """The ingress of ``config`` served by uvicorn on a local port (no dispatcher, no state): its URL."""
    catalog = Catalog(config, model_cards(config))
    app = build_ingress_app(Ingress(config, catalog, dispatcher=None, state=None, replica="ingress-test"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the ingress did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def url():
    with ingress_alone(CONFIG) as address:
        yield address


def post(url: str, body, path: str = "/v1/images/generations", headers=AUTH, **options):
    return requests.post(url + path, json=body, headers=headers, timeout=60, **options)


def assert_refused(response, param: str | None, status: int = 400, kind: str = "invalid_request_error"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


BAD = [
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "0x0"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "size": "37x36"}, "size"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 100000}, "steps"),
    ({"prompt": "x", "steps": "many"}, "steps"),
    ({"prompt": "x", "n": 100}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "\x00\x00"}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": "x" * (10 << 20)}, "prompt"),
    ({"size": "36x36"}, "prompt"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "model": "tiny-wan"}, "model"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": "x", "true_cfg_scale": -1}, "true_cfg_scale"),
    ({"prompt": "x", "scheduler": "heun"}, "scheduler"),  # Flux's pipeline cannot step Heun
    ({"prompt": "x", "scheduler": "euler_a"}, "scheduler"),
    ({"prompt": "x", "scheduler": ""}, "scheduler"),
    ({"prompt": "x", "scheduler": 3}, "scheduler"),
    ({"prompt": "x", "loras": [{"name": "../ink"}]}, "loras"),
    ({"prompt": "x", "loras": [{"name": "/etc/passwd"}]}, "loras"),
    ({"prompt": "x", "loras": [{"name": "https://example.com/ink"}]}, "loras"),
    ({"prompt": "x", "loras": [{"name": "notes"}]}, "loras"),  # no such adapter in the sources
    ({"prompt": "x", "loras": [{"name": "ink", "scale": 99}]}, "loras"),
    ({"prompt": "x", "loras": [{"name": "ink"}, {"name": "ink"}]}, "loras"),
    ({"prompt": "x", "loras": [{"name": "ink"}] + [{"name": f"a{i}"} for i in range(4)]}, "loras"),
    ({"prompt": "x", "loras": [{"name": "ink", "weight": 1}]}, "loras"),
    ({"prompt": "x", "loras": "ink"}, "loras"),
    ({"prompt": "x", "model": "tiny-4", "loras": [{"name": "ink"}]}, "loras"),  # served without adapters
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{param}{i}" for i, (_, param) in enumerate(BAD)])
def test_bad_input_gets_a_json_400_naming_the_field(url, body, param):
    for path in ("/v1/images/generations", "/v1/generate"):
        assert_refused(post(url, body, path), param)


def test_streams_are_refused_where_they_cannot_be_made_before_any_work(url):
    """One image per stream, OpenAI's 0-3 previews, no stream of a background job nor of the PNG endpoint."""
    stream = {"prompt": "x", "stream": True}
    for body, param in (
        ({**stream, "n": 2}, "n"),
        ({**stream, "partial_images": 4}, "partial_images"),
        ({**stream, "partial_images": -1}, "partial_images"),
        ({**stream, "background": True}, "stream"),
    ):
        assert_refused(post(url, body), param)
    assert_refused(post(url, stream, "/v1/generate"), "stream")


def test_bodies_that_are_no_json_object_get_a_json_400(url):
    for data, content_type in (
        ("{not json", "application/json"),
        ("[1, 2]", "application/json"),
        ('"a prompt"', "application/json"),
        ('{"prompt": "x"}', "text/plain"),
        ("", "application/json"),
    ):
        response = requests.post(
            url + "/v1/images/generations",
            data=data,
            headers={**AUTH, "Content-Type": content_type},
            timeout=30,
        )
        assert_refused(response, None)


def test_a_missing_or_wrong_key_gets_401(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = post(url, {"prompt": "x"}, headers=headers)
        assert_refused(response, None, 401, "authentication_error")
    for path in ("/v1/models", "/v1/videos", "/v1/images/0123.png", "/v1/videos/video_1"):
        assert requests.get(url + path, timeout=30).status_code == 401, path


VIDEO = {"model": "tiny-wan", "prompt": "a fox", "size": "80x48", "frames": 9, "steps": 2, "seed": 1}
VIDEO_BAD = [
    ({**VIDEO, "size": "37x37"}, "size"),
    ({**VIDEO, "frames": 10}, "frames"),
    ({**VIDEO, "frames": 1000}, "frames"),
    ({**VIDEO, "seconds": 1}, "seconds"),  # with frames
    ({**VIDEO, "steps": 0}, "steps"),
    ({**VIDEO, "prompt": " "}, "prompt"),
    ({**VIDEO, "model": "tiny-2"}, "model"),  # an image model
    ({**VIDEO, "model": "nope"}, "model"),
    ({**VIDEO, "fps": 30}, "fps"),
    ({**VIDEO, "scheduler": "ddim"}, "scheduler"),  # SDXL's, not a flow model's
]


def test_the_video_api_refuses_bad_input(url):
    for body, param in VIDEO_BAD:
        assert_refused(post(url, body, "/v1/videos"), param)
    not_json = requests.post(
        url + "/v1/videos", data=b"{", headers={**AUTH, "Content-Type": "application/json"}, timeout=30
    )
    assert_refused(not_json, None)
    form = {k: (None, str(v)) for k, v in {**VIDEO, "frames": 10}.items()}
    assert_refused(requests.post(url + "/v1/videos", files=form, headers=AUTH, timeout=30), "frames")
    bad_format = requests.get(url + "/v1/videos/video_0123/content?format=avi", headers=AUTH, timeout=30)
    assert_refused(bad_format, "format")
    assert_refused(requests.get(url + "/v1/videos?limit=0", headers=AUTH, timeout=30), "limit")


def test_edits_refuse_bad_uploads(url):
    source = random_png(40, 36, seed=1)
    form = {"model": "tiny-2", "prompt": "x", "steps": "2"}

    def edit(files, data=form):
        return requests.post(url + "/v1/images/edits", files=files, data=data, headers=AUTH, timeout=60)

    cases = [
        ({"image": ("a.png", b"not an image")}, form, "image"),
        ({"image": ("a.png", b"")}, form, "image"),
        ({"image": ("a.png", source), "mask": ("m.png", left_half_mask(36, 36))}, form, "mask"),
        ({"image": ("a.png", source)}, {**form, "strength": "1.5"}, "strength"),
        ({"image": ("a.png", source)}, {**form, "strength": "0.1"}, "strength"),  # 2 x 0.1 < 1 step
        ({"image": ("a.png", source)}, {**form, "model": "tiny-wan"}, "model"),
        ({"image": ("a.png", source)}, {**form, "size": "37x36"}, "size"),
        ({"image": ("a.png", source), "image[]": ("b.png", source)}, form, "image"),
        ({"mask": ("m.png", source)}, form, "image"),
        ({"image": ("a.png", source)}, {**form, "stream": "true", "n": "2"}, "n"),  # one streamed image
        ({"image": ("a.png", source)}, {**form, "stream": "true", "partial_images": "4"}, "partial_images"),
        ({"image": ("a.png", source)}, {**form, "colour": "red"}, "colour"),
        ({"image": ("a.png", source), "control_image": ("c.png", b"text")}, form, "control_image"),
        ({"image": ("a.png", source)}, {**form, "loras[0][name]": "nope"}, "loras"),  # OpenAI's client
        ({"image": ("a.png", source)}, {**form, "loras[0][name]": "ink", "loras[0][scale]": "x"}, "loras"),
        ({"image": ("a.png", source)}, {**form, "loras": '[{"name": "../ink"}]'}, "loras"),
        ({"image": ("a.png", source)}, {**form, "loras": "[{"}, "loras"),
    ]
    for files, data, param in cases:
        assert_refused(edit(files, data), param)
    assert_refused(edit({"image": ("a.png", b"\x00" * (41 << 20))}), "image")
    as_text = requests.post(url + "/v1/images/edits", data="x", headers=AUTH, timeout=30)
    assert "multipart" in assert_refused(as_text, None)["message"]


def test_json_edits_refuse_bad_image_references(url):
    """The JSON form of an edit (an edits batch's lines are one): ``images`` and ``mask`` as OpenAI's image
    references, each checked as an upload is; URLs are not fetched."""
    source = "data:image/png;base64," + base64.b64encode(random_png(40, 36, seed=1)).decode()
    body = {"model": "tiny-2", "prompt": "x", "steps": 2, "images": [{"image_url": source}]}
    mask = "data:image/png;base64," + base64.b64encode(left_half_mask(36, 36)).decode()
    cases = [
        ({"model": "tiny-2", "prompt": "x"}, "images"),
        ({**body, "images": []}, "images"),
        ({**body, "images": [{"image_url": source}] * 2}, "images"),
        ({**body, "images": [{"image_url": "https://example.com/a.png"}]}, "images"),
        ({**body, "images": [{"image_url": source, "file_id": "file-1"}]}, "images"),
        ({**body, "images": [{}]}, "images"),
        ({**body, "images": [{"image_url": "data:image/png;base64,@@"}]}, "images"),
        ({**body, "images": [{"image_url": "data:image/png;base64,AAAA"}]}, "images"),  # no image
        ({**body, "images": [{"url": source}]}, "images"),
        ({**body, "mask": {"image_url": mask}}, "mask"),  # not the image's size
        ({**body, "strength": 1.5}, "strength"),
        ({**body, "size": "37x36"}, "size"),
        ({**body, "stream": True, "n": 2}, "n"),
    ]
    for bad, param in cases:
        response = post(url, bad, "/v1/images/edits")
        error = assert_refused(response, param)
        if "example.com" in str(bad):
            assert "fetches no URLs" in error["message"], error


def test_controlnet_and_image_prompt_fields_are_checked_against_the_pools(url):
    control = base64.b64encode(random_png(40, 36, seed=7)).decode()
    body = {"model": "tiny-2", "prompt": "a house", "size": "40x36", "steps": 3, "control_image": control}
    for bad, param in (
        ({**body, "controlnet": "canny"}, "controlnet"),
        ({**body, "model": "tiny-4"}, "control_image"),  # served without ControlNets
        ({**body, "control_image": "not base64!"}, "control_image"),
        ({**body, "control_image": base64.b64encode(b"text").decode()}, "control_image"),
        ({k: v for k, v in body.items() if k != "control_image"} | {"controlnet": "x"}, "controlnet"),
        ({**body, "control_image": [control] * 2, "controlnet_scale": [1, 1, 1]}, "controlnet_scale"),
        ({**body, "control_image": [control] * 5}, "control_image"),  # at most 4
        ({**body, "controlnet_scale": 5}, "controlnet_scale"),
        ({**body, "control_image": None, "ip_adapter_image": control, "model": "tiny-4"}, "ip_adapter_image"),
    ):
        assert_refused(post(url, bad), param)


def test_models_health_and_docs_answer_without_any_pool(url):
    models = requests.get(url + "/v1/models", headers=AUTH, timeout=30).json()["data"]
    assert {m["id"]: [p["ranks"] for p in m["pools"]] for m in models} == {
        "tiny-2": [2],
        "tiny-4": [4],
        "tiny-wan": [2],
    }
    assert {m["id"]: m["kind"] for m in models}["tiny-wan"] == "video"
    # The cost unit's attention term: the family's measured one (Flux's, Wan's; 0, linear, where unmeasured).
    assert {m["id"]: m["attention_cost_per_megapixel"] for m in models} == {
        "tiny-2": 0.117,
        "tiny-4": 0.117,
        "tiny-wan": 0.0387,
    }
    assert {m["id"]: m["controlnets"] for m in models}["tiny-2"] == ["tiny-flux-controlnet"]
    assert {m["id"]: m["loras"] for m in models} == {
        "tiny-2": ["ink", "styles/sketch"],
        "tiny-4": [],
        "tiny-wan": [],
    }
    samplers = {m["id"]: (m["schedulers"], m["default_scheduler"]) for m in models}
    assert samplers["tiny-2"] == (["euler", "dpm++2m", "unipc"], "euler")
    assert samplers["tiny-wan"] == (["euler", "heun", "dpm++2m", "unipc"], "unipc")
    assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
    assert requests.get(url + "/docs", timeout=30).status_code == 200
    assert "/v1/images/generations" in requests.get(url + "/openapi.json", timeout=30).json()["paths"]


def test_json_numbers_sent_as_strings_are_refused_but_form_fields_convert(url):
    assert_refused(post(url, {"prompt": "x", "steps": "7"}), "steps")
    assert_refused(post(url, {"prompt": "x", "guidance": "3"}), "guidance")
    assert_refused(post(url, {**VIDEO, "frames": "9", "size": "37x37"}, "/v1/videos"), "frames")
    # A form's fields are text: "7" is 7 there (and the size is what this form gets wrong).
    form = {k: (None, str(v)) for k, v in {**VIDEO, "size": "37x37"}.items()}
    assert_refused(requests.post(url + "/v1/videos", files=form, headers=AUTH, timeout=30), "size")


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixels are not there)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_messages_name_the_real_reason_and_the_field(url):
    nan = requests.post(
        url + "/v1/images/generations",
        data='{"prompt": "x", "guidance": NaN}',
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert "finite" in assert_refused(nan, "guidance")["message"]
    frames = assert_refused(post(url, {**VIDEO, "frames": 10}, "/v1/videos"), "frames")
    assert "num_frames" not in frames["message"] and "frames=10" in frames["message"]
    form = {"model": "tiny-2", "prompt": "x", "steps": "2"}
    for side in (16000, 40000):  # a header too large for any decoder, refused by its claimed size
        began = time.monotonic()
        response = requests.post(
            url + "/v1/images/edits",
            files={"image": ("a.png", png_header_claiming(side, side))},
            data=form,
            headers=AUTH,
            timeout=30,
        )
        message = assert_refused(response, "image")["message"]
        assert f"{side * side} pixels is more than" in message and time.monotonic() - began < 1


def test_401_names_its_scheme_and_oversized_headers_get_431(url):
    response = post(url, {"prompt": "x"}, headers={})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    many = {f"X-Filler-{i}": "x" for i in range(200)}
    assert_refused(post(url, {"prompt": "x"}, headers={**AUTH, **many}), None, 431)
    huge = {"X-Filler": "x" * (256 << 10)}
    assert_refused(post(url, {"prompt": "x"}, headers={**AUTH, **huge}), None, 431)
    assert requests.get(url + "/healthz", headers=huge, timeout=30).status_code == 431


def test_files_and_batches_refuse_bad_input_before_any_state(url):
    """OpenAI's Files and Batch APIs: what is wrong with the request itself is a 400 naming the field."""
    assert_refused(
        post(url, {"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}, "/v1/batches"), "endpoint"
    )
    assert_refused(
        post(
            url,
            {"input_file_id": "file-1", "endpoint": "/v1/images/generations", "completion_window": "1d"},
            "/v1/batches",
        ),
        "completion_window",
    )
    for window in ("0s", "169h", "24 h", "-1h"):
        body = {"input_file_id": "file-1", "endpoint": "/v1/videos", "completion_window": window}
        assert_refused(post(url, body, "/v1/batches"), "completion_window")
    assert_refused(post(url, {"endpoint": "/v1/images/generations"}, "/v1/batches"), "input_file_id")
    assert_refused(post(url, {"purpose": "batch"}, "/v1/files"), "file")  # JSON, not a form
    upload = {"file": ("in.jsonl", b"{}\n")}
    for purpose, param in (("fine-tune", "purpose"), ("batch_output", "purpose")):
        response = requests.post(
            url + "/v1/files", files=upload, data={"purpose": purpose}, headers=AUTH, timeout=60
        )
        assert_refused(response, param)
    response = requests.post(
        url + "/v1/files", data={"purpose": "batch"}, files={"x": ("a", b"")}, headers=AUTH, timeout=60
    )
    assert_refused(response, "file")
    assert (
        requests.post(url + "/v1/files", files=upload, data={"purpose": "batch"}, timeout=60).status_code
        == 401
    )


def test_usage_windows_refuse_a_bad_query_naming_the_parameter_before_any_state(url):
    """A usage window the state could not answer is a 400 at the ingress (this one has no state)."""
    for query, param in (
        ("end_time=100", "start_time"),
        ("start_time=200&end_time=100", "end_time"),
        ("start_time=0&end_time=172800&bucket_width=1m", "bucket_width"),
        ("start_time=0&bucket_width=1w", "bucket_width"),
        ("start_time=yesterday", "start_time"),
    ):
        answer = requests.get(url + "/v1/usage?" + query, headers=AUTH, timeout=30)
        assert answer.status_code == 400, (query, answer.text)
        assert answer.json()["error"]["param"] == param, (query, answer.json())
