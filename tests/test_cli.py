"""The ``rayxdit`` command with real arguments, real ranks and real PNG files. What only a process of its own
shows (its exit status and stderr as the shell sees them, ``rayxdit serve``, ``--help``) runs as a real
subprocess; the other cases call the command's ``main()`` in this process (:func:`command`), whose ranks fork
from this process's forkserver, started once with the model stack: a process per case would import the model
stack twice (itself and its own forkserver), ~9 s a case on 2 cores against ~1 s."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rayxdit.config import ParallelConfig
from tests.helpers import free_port

ARGS = [
    "generate",
    "--prompt",
    "a red fox in the snow",
    "--height",
    "40",
    "--width",
    "40",
    "--steps",
    "3",
    "--seed",
    "3",
]


def rayxdit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayxdit.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def command(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``rayxdit *args`` through its ``main()`` in this process: the exit status, stdout and stderr it gives
    the shell (what :func:`rayxdit` returns for a process of its own)."""
    from rayxdit import cli

    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["rayxdit", *args], code, captured.out, captured.err)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "parallel"),
    [("tiny-flux", "ulysses=2,ring=2"), ("tiny-sd3", "cfg=2,ulysses=2"), ("tiny-sdxl", "cfg=2,ring=2")],
)
def test_parallel_png_equals_single_rank_png(tmp_path, capsys, model, parallel):
    from rayxdit.config import EngineConfig
    from rayxdit.engine import Engine
    from rayxdit.parallel.mesh import ParallelState
    from rayxdit.request import GenerateRequest

    parallel_png = tmp_path / "parallel.png"
    done = command(capsys, *ARGS, "--model", model, "--parallel", parallel, "--out", str(parallel_png))
    assert done.returncode == 0, done.stderr
    assert f"{ParallelConfig.parse(parallel)} on 4 rank(s)" in done.stderr
    # The single rank in this process (the CLI's own single-rank path is the default of every other test).
    request = GenerateRequest(prompt=ARGS[2], height=40, width=40, steps=3, seed=3)
    single = Engine(EngineConfig(model=model), ParallelState.single()).generate(request).images[0]
    a = np.asarray(single, dtype=np.int16)
    b = np.asarray(Image.open(parallel_png), dtype=np.int16)
    assert a.shape == b.shape == (40, 40, 3)
    assert np.abs(a - b).max() <= 1, "parallel image differs from the single-rank image by more than 1/255"


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ("ulysses=3", "ulysses=3 does not divide the model's 8 attention heads"),
        ("zigzag=2", "unknown parallel method 'zigzag'"),
        ("ulysses=2,cfg=2,pipefusion=16", "pipefusion=16 exceeds the model's 4 transformer blocks"),
        ("pipefusion=2,ring=2", "split tokens with ulysses"),
        ("ring=128", "128 CPU ranks is more than this launcher starts"),
        ("ring=two", "ring='two': the degree must be an integer"),
    ],
)
def test_invalid_parallel_exits_with_one_clear_line(parallel, message, tmp_path, capsys):
    # The next test runs the real process.
    done = command(
        capsys, *ARGS, "--model", "tiny-flux", "--parallel", parallel, "--out", str(tmp_path / "x.png")
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "x.png").exists()


def test_pipefusion_on_a_unet_is_refused_up_front(tmp_path):
    done = rayxdit(
        *ARGS, "--model", "tiny-sdxl", "--parallel", "pipefusion=2", "--out", str(tmp_path / "x.png")
    )
    assert done.returncode == 2
    assert "PipeFusion is implemented for Flux" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_request_the_parallel_model_refuses_exits_with_one_clear_line(tmp_path, capsys):
    """A check only the loaded model can make (SDXL: a band of rows per rank) still ends in one line."""
    out = tmp_path / "x.png"
    done = command(
        capsys, *ARGS[:3], "--model", "tiny-sdxl", "--height", "8", "--parallel", "ring=2", "--out", str(out)
    )
    assert done.returncode == 2, done.stderr
    assert "fewer than this group's 2 patch-parallel ranks; use height >= 16" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_help_explains_every_flag():
    done = rayxdit("generate", "--help")
    assert done.returncode == 0
    for flag in (
        "--model",
        "--prompt",
        "--negative-prompt",
        "--height",
        "--width",
        "--steps",
        "--seed",
        "--guidance",
        "--true-cfg-scale",
        "--parallel",
        "--out",
    ):
        assert flag in done.stdout
    assert "ulysses" in done.stdout and "ring" in done.stdout


RANK_ENV_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="error")
names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-rank1")]
rank = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
own = ray.get(rank.__ray_call__.remote(lambda self: ray.get_runtime_context().runtime_env))
seen = ray.get(rank.environment.remote(["HF_TOKEN"]))["HF_TOKEN"]  # in the rank's own process
# What the rank actor's worker imported before it was given the actor (the actor itself imports neither).
preloaded = ray.get(rank.__ray_call__.remote(lambda self: sorted(set(sys.modules) & {"ray.serve._private.replica"})))
print(json.dumps([own, seen, preloaded]))
"""


@pytest.mark.slow
def test_serve_default_answers_curl_with_a_png(tmp_path):
    """README's first command: `rayxdit serve` with no config (local Ray, tiny-flux on CPU). A gated
    model's HF_TOKEN set for it reaches the ranks' processes, and no actor gets a runtime environment for it
    (the Ray started here inherits it: a runtime_env would have Ray start every replica's and rank's worker
    through its agent, a slower start). Its Ray's workers import Serve's replica module as they start
    (config.SERVING_WORKER_PRELOAD), before they are given an actor."""
    import signal
    import time

    import requests

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read back after the process ends
    server = subprocess.Popen(
        [sys.executable, "-m", "rayxdit.cli", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_TOKEN": "hf_rayxdit_test_token"},
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            if "serving on" in (tmp_path / "serve.log").read_text():
                break
            time.sleep(2)
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        readiness = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        assert readiness.status_code == 200, "'serving on' was printed before the application was ready"
        response = requests.post(
            f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a red fox"}, timeout=300
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "PNG" and image.size == (128, 128)
        # Join this instance as the startup message says ("auto" could find another test's instance).
        address = re.search(r"RAY_ADDRESS=(\S+)", (tmp_path / "serve.log").read_text()).group(1)
        probe = subprocess.run(
            [sys.executable, "-c", RANK_ENV_PROBE, address],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_AUTH_MODE": "token"},
        )
        assert probe.returncode == 0, probe.stderr[-2000:]
        own, seen, preloaded = json.loads(probe.stdout.strip().splitlines()[-1])
        assert seen == "hf_rayxdit_test_token"
        assert preloaded == ["ray.serve._private.replica"], "a rank actor's worker imported nothing ahead"
        assert not own.get("env_vars"), own
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # stuck: its threads' stacks into the log (SIGUSR1), then kill it
            server.send_signal(signal.SIGUSR1)
            time.sleep(3)
            server.kill()
            code = None
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0 and "rayxdit: stopping" in output, output[-3000:]
    # A healthy run and a normal Ctrl-C print nothing a user must learn to ignore.
    for noise in (
        "Traceback",
        "graceful_shutdown",
        "FutureWarning",
        "leaked semaphore",
        "Failed to get queue",
    ):
        assert noise not in output, f"{noise!r} in the output of a healthy run:\n{output[-3000:]}"


@pytest.mark.slow
def test_wan_video_parallel_equals_single_rank(tmp_path, capsys):
    """Text-to-video: the animated PNG from ulysses=2,ring=2 equals the single rank's frames (written as a
    directory of PNGs) frame by frame."""
    video = ["generate", "--model", "tiny-wan", "--prompt", "a red fox", "--frames", "9", "--steps", "3"]
    frames, parallel = tmp_path / "frames", tmp_path / "parallel.png"
    done = command(capsys, *video, "--out", str(frames))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in frames.iterdir()) == [f"frame-{i:04d}.png" for i in range(9)]
    done = command(capsys, *video, "--parallel", "ulysses=2,ring=2", "--out", str(parallel))
    assert done.returncode == 0, done.stderr
    animation = Image.open(parallel)
    assert animation.n_frames == 9
    for index in range(9):
        animation.seek(index)
        frame_a = np.asarray(Image.open(frames / f"frame-{index:04d}.png").convert("RGB"), dtype=np.int16)
        frame_b = np.asarray(animation.convert("RGB"), dtype=np.int16)
        assert frame_a.shape == frame_b.shape == (48, 80, 3)
        assert np.abs(frame_a - frame_b).max() <= 1, f"frame {index} differs by more than 1/255"


def test_preview_writes_each_partial_image_as_it_forms_and_leaves_the_image_as_it_is(tmp_path, capsys):
    """--preview 2 on 2 ranks (rank 0 polled over its control pipe while the step loop runs): two previews
    of the image's size, written as they are made, different from each other and from the image, which
    equals the one made without previews; a video model is refused with one line."""
    plain, watched = tmp_path / "plain.png", tmp_path / "watched.png"
    form = [*ARGS[:-4], "--steps", "8", "--seed", "5", "--parallel", "ulysses=2"]
    assert command(capsys, *form, "--out", str(plain)).returncode == 0
    done = command(capsys, *form, "--preview", "2", "--out", str(watched))
    assert done.returncode == 0, done.stderr
    previews = [tmp_path / f"watched.preview-{i}.png" for i in range(2)]
    assert [line for line in done.stderr.splitlines() if line.startswith("preview")] == [
        f"preview {i + 1} of 2: {path}" for i, path in enumerate(previews)
    ]
    pixels = [np.asarray(Image.open(path), dtype=np.int16) for path in [*previews, watched, plain]]
    assert all(image.shape == (40, 40, 3) for image in pixels)
    assert np.abs(pixels[2] - pixels[3]).max() <= 1, "previews must not change the image"
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert np.abs(pixels[a] - pixels[b]).max() > 2, (a, b)
    video = command(capsys, "generate", "--model", "tiny-wan", "--prompt", "x", "--preview", "1")
    assert video.returncode == 2 and "--preview: image models only" in video.stderr


@pytest.mark.slow
def test_inpainting_and_controlnet_from_the_cli_equal_the_single_process_engine(tmp_path, capsys):
    """--image/--mask/--strength and --controlnet/--control-image on 2 ranks give the in-process engine's
    image; an edit's size defaults to the input image's; a file that is not an image is refused with one
    line."""
    from rayxdit.config import EngineConfig
    from rayxdit.engine import Engine
    from rayxdit.parallel.mesh import ParallelState
    from rayxdit.request import ControlInput, GenerateRequest

    source, mask = tmp_path / "source.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(source)
    Image.fromarray(np.where(np.arange(44) < 20, 255, 0).astype(np.uint8)[None].repeat(36, 0)).save(mask)
    edit = [
        "generate",
        "--prompt",
        "a field",
        "--image",
        str(source),
        "--mask",
        str(mask),
        "--strength",
        "0.9",
    ]
    done = command(
        capsys, *edit, "--steps", "4", "--parallel", "ulysses=2", "--out", str(tmp_path / "out.png")
    )
    assert done.returncode == 0, done.stderr
    served = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"), dtype=np.int16)
    request = GenerateRequest(
        prompt="a field",
        image=source.read_bytes(),
        mask=mask.read_bytes(),
        strength=0.9,
        width=44,
        height=36,
        steps=4,
    )
    single = Engine(EngineConfig(model="tiny-flux"), ParallelState.single()).generate(request).images[0]
    assert served.shape == (36, 44, 3)
    assert np.abs(served - np.asarray(single, dtype=np.int16)).max() <= 1
    control = tmp_path / "control.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(control)
    conditioned = ["generate", "--prompt", "a house", "--controlnet", "tiny-flux-controlnet", "--steps", "3"]
    conditioned += [
        "--control-image",
        str(control),
        "--width",
        "44",
        "--height",
        "36",
        "--parallel",
        "ring=2",
    ]
    done = command(capsys, *conditioned, "--out", str(tmp_path / "controlled.png"))
    assert done.returncode == 0, done.stderr
    served = np.asarray(Image.open(tmp_path / "controlled.png").convert("RGB"), dtype=np.int16)
    request = GenerateRequest(
        prompt="a house",
        controls=(ControlInput(image=control.read_bytes(), controlnet="tiny-flux-controlnet"),),
        width=44,
        height=36,
        steps=3,
    )
    config = EngineConfig(model="tiny-flux", controlnets=("tiny-flux-controlnet",))
    single = Engine(config, ParallelState.single()).generate(request).images[0]
    assert np.abs(served - np.asarray(single, dtype=np.int16)).max() <= 1
    (tmp_path / "text.png").write_text("not an image")
    bad = command(capsys, "generate", "--prompt", "x", "--image", str(tmp_path / "text.png"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "rayxdit generate: error: --image"
    )
