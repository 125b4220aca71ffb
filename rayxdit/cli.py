"""``rayxdit``: generate images on one or many ranks, or serve them over HTTP.

rayxdit generate --model tiny-flux --prompt "a red fox" --parallel "ulysses=2,ring=2" --out fox.png
rayxdit serve                      # local Ray, tiny-flux on CPU, http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from pathlib import Path

from rayxdit.config import add_engine_arguments, worker_preload_env

# Third-party import-time chatter (e.g. transformers noting that torchvision is absent) is not for users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EXAMPLES = """examples:
  rayxdit generate --prompt "a lighthouse at dusk" --out lighthouse.png
  rayxdit generate --model tiny-flux --prompt "a cat" --parallel "ulysses=2,ring=2" --out cat.png
  rayxdit generate --prompt "a cat" --steps 12 --preview 3 --out cat.png   # watch it form
  rayxdit generate --model black-forest-labs/FLUX.1-dev --prompt "a cat" --steps 28 \\
      --negative-prompt "blurry" --true-cfg-scale 4 --parallel "cfg=2,ulysses=4" --compile --out cat.png
"""


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from a prompt, on one rank or split over several",
        description="Generate images from a prompt. With --parallel, local processes are started "
        "(gloo on CPU, NCCL on GPUs) and every image is split over them; the result equals the "
        "single-rank image of the same seed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_arguments(
        parser.add_argument_group(
            "engine (how the model is loaded and split; the same options as a pool's and the batch job's)"
        ),
        defaults={"model": "tiny-flux"},
    )
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (true CFG)")
    parser.add_argument(
        "--height", type=int, default=None, help="pixels; default: the model's (1024 for Flux)"
    )
    parser.add_argument(
        "--width", type=int, default=None, help="pixels; default: the model's (1024 for Flux)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps; default: the model's (28 for Flux)"
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        help="the sampler: euler, heun, dpm++2m, unipc (flow models: Flux, SD3, Wan; Flux without heun); "
        "euler, dpm++2m, dpm++2m-karras, unipc, ddim (SDXL); default: the checkpoint's own",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; image i uses seed+i (default: 0)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="Flux.1-dev: distilled guidance; SD3, SDXL and Wan: the CFG scale, two branches per step above 1 "
        "(default: the model's: Flux 3.5, SD3 7, SDXL 5, Wan 5)",
    )
    parser.add_argument(
        "--true-cfg-scale",
        type=float,
        default=1.0,
        help="true classifier-free guidance; > 1 with --negative-prompt runs two branches per step "
        "(default: %(default)s, off)",
    )
    parser.add_argument(
        "--num-images", type=int, default=1, help="images (or videos) for the prompt (default: 1)"
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="video models (Wan): frames per video, 1 + a multiple of 4; default: the model's (81 for Wan)",
    )
    parser.add_argument("--fps", type=int, default=16, help="video models: frames per second (default: 16)")
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        help="Flux, SD3, SDXL: start from this image (img2img; a Kontext model edits it); the size defaults to "
        "the image's, fitted to the model",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="with --image: inpaint, repainting where the mask is white and keeping where it is black "
        "(the image's size)",
    )
    parser.add_argument(
        "--control-image",
        type=Path,
        action="append",
        default=[],
        help="with --controlnet: a conditioning image; repeat for several ControlNets (residuals summed)",
    )
    parser.add_argument(
        "--controlnet-scale",
        type=float,
        action="append",
        default=[],
        help="with --controlnet: the weight of its residuals, once for all or once per control image "
        "(default: 1.0)",
    )
    parser.add_argument(
        "--control-mode",
        type=int,
        action="append",
        default=[],
        help="union ControlNets: what the control image shows (the checkpoint's numbering), once for all or "
        "once per control image",
    )
    parser.add_argument(
        "--ip-adapter-image", type=Path, default=None, help="with --ip-adapter: the image prompt"
    )
    parser.add_argument(
        "--ip-adapter-scale",
        type=float,
        default=1.0,
        help="with --ip-adapter: the image prompt's weight (default: %(default)s)",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=0.6,
        help="with --image: how much of it is noised away, 0..1; the last steps x strength steps run "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--preview",
        type=int,
        choices=range(4),
        default=0,
        metavar="N",
        help="image models: watch it form: N (1-3) previews at evenly spaced steps, each the clean image as "
        "predicted there, written beside --out as <name>.preview-<i>.png as soon as it is made and drawn in the "
        "terminal when stderr is one (not on PipeFusion; default: 0, none)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out.png"),
        help="where to write the PNG; with --num-images N, files get -0..-N-1 suffixes. Videos: .png "
        "(animated PNG), .gif, .mp4 or a path without suffix for a directory of "
        "frames (default: out.png)",
    )
    parser.set_defaults(handler=_generate)


def _request_from_args(args: argparse.Namespace):
    """The request the flags describe; a bad value is a one-line usage error naming the flag."""
    from pydantic import ValidationError

    from rayxdit.request import GenerateRequest, RequestError, pair_controls

    if args.control_image and not args.controlnets:
        raise UsageError("--control-image needs --controlnet (the ControlNet that reads it)")
    if args.ip_adapter_image is not None and not args.ip_adapter:
        raise UsageError("--ip-adapter-image needs --ip-adapter")
    try:
        controls = pair_controls(
            [_read_image(path, "control-image") for path in args.control_image],
            args.controlnets if len(args.controlnets) > 1 else [],
            args.controlnet_scale,
            args.control_mode,
            tuple(args.controlnets),
        )
    except RequestError as error:
        param = error.param or "control_image"
        raise UsageError(f"--{param.replace('_', '-')}: {str(error).removeprefix(param + ': ')}") from None
    try:
        return GenerateRequest(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            steps=args.steps,
            seed=args.seed,
            scheduler=args.scheduler,
            guidance=args.guidance,
            true_cfg_scale=args.true_cfg_scale,
            num_images=args.num_images,
            num_frames=args.frames,
            image=_read_image(args.image, "image"),
            mask=_read_image(args.mask, "mask"),
            strength=args.strength,
            controls=controls,
            ip_adapter_image=_read_image(args.ip_adapter_image, "ip-adapter-image"),
            ip_adapter_scale=args.ip_adapter_scale,
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = {"num_frames": "frames"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise UsageError(f"--{field.replace('_', '-')}: {first['msg']}") from None


def _read_image(path: Path | None, option: str) -> bytes | None:
    """An input image's bytes, checked as the HTTP API checks uploads."""
    from rayxdit.request import RequestError
    from rayxdit.uploads import inspect_image

    if path is None:
        return None
    try:
        data = path.read_bytes()
        inspect_image(data, option)
    except OSError as error:
        raise UsageError(f"--{option} {path}: {error.strerror}") from None
    except RequestError as error:
        raise UsageError(f"--{option} {path}: {str(error).split(': ', 1)[-1]}") from None
    return data


def _fit_to_image(request, limits):
    """An edit without --width/--height takes the input image's size (as the HTTP API does)."""
    from rayxdit.uploads import edit_size, image_size

    if request.image is None:
        return request
    mask_size = None if request.mask is None else image_size(request.mask)
    width, height = edit_size(image_size(request.image), mask_size, request.width, request.height, limits)
    return request.model_copy(update={"width": width, "height": height})


def _write_outputs(result, out: Path, fps: int) -> None:
    """One file per image or video: ``out``, or ``out-0``, ``out-1``... for several."""
    from rayxdit.imaging import save_video

    videos = result.videos
    paths = (
        [out]
        if len(videos) == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(videos))]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    for frames, path in zip(videos, paths, strict=True):
        if result.frames_per_video == 1:
            frames[0].save(path)
        else:
            save_video(frames, path, fps)
        print(path)


def _preview_writer(out: Path, previews: int):
    """``on_preview(index, png)`` for ``--preview``: each preview written beside ``out`` and its path printed;
    drawn in the terminal too when stderr is one (and NO_COLOR is not set)."""
    from rayxdit.imaging import terminal_thumbnail

    draw = sys.stderr.isatty() and not os.environ.get("NO_COLOR")

    def on_preview(index: int, png: bytes) -> None:
        path = out.with_name(f"{out.stem}.preview-{index}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        print(f"\npreview {index + 1} of {previews}: {path}", file=sys.stderr)
        if draw:
            print(terminal_thumbnail(png), file=sys.stderr)

    return on_preview


def _generate(args: argparse.Namespace) -> int:
    from rayxdit.config import engine_config_from_args
    from rayxdit.imaging import check_video_path
    from rayxdit.runtime.local import check_launchable

    # Cheap checks first: a bad --parallel fails before diffusers is even imported.
    config = engine_config_from_args(args)
    parallel = config.parallel
    check_launchable(parallel.world_size)
    if config.quantize:
        import torch

        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise UsageError("--quantize fp8 needs an NVIDIA GPU with float8 tensor cores (Ada or Hopper)")
    request = _request_from_args(args)
    from rayxdit.runtime.cards import model_card
    from rayxdit.runtime.local import run_local_group, run_local_with_previews

    card = model_card(config.model)
    card.check_engine(config)
    request = _fit_to_image(request, card.limits)
    card.limits.resolve(request)
    if card.limits.makes_video:
        try:
            check_video_path(args.out)
        except ValueError as error:
            raise UsageError(f"--out {error}") from None
    if parallel.cfg > 1 and not card.uses_cfg(card.limits.resolve(request).request):
        print(
            "note: this request runs no CFG (Flux: add --negative-prompt and --true-cfg-scale > 1), so "
            "both cfg ranks compute the same branch",
            file=sys.stderr,
        )
    if args.preview:
        if card.limits.makes_video:
            raise UsageError("--preview: image models only (a video's previews are not made)")
        if parallel.pipefusion > 1:
            print("note: PipeFusion makes no previews; --preview shows none", file=sys.stderr)
        request = request.model_copy(update={"partial_images": args.preview})
        encoded = run_local_with_previews(config, request, _preview_writer(args.out, args.preview), True)
    else:
        (encoded,) = run_local_group(config, [request], progress=True)
    result = encoded.decode()
    _write_outputs(result, args.out, args.fps)
    timings = ", ".join(
        f"{k.removesuffix('_s')} {v:.2f} s" if k.endswith("_s") else f"{k.replace('_', ' ')} {v:g}"
        for k, v in result.timings.items()
    )
    print(f"{parallel} on {parallel.world_size} rank(s): {timings}", file=sys.stderr)
    return 0


SERVE_EPILOG = """examples:
  rayxdit serve                                   # local Ray, tiny-flux on CPU, http://127.0.0.1:8000
  rayxdit serve --config serve_configs/flux-dev-8gpu.yaml --host 0.0.0.0
  rayxdit serve --address auto                    # join a running Ray cluster
  rayxdit serve --metrics-port 8080               # Prometheus text at http://127.0.0.1:8080/metrics

then:
  curl -s http://127.0.0.1:8000/v1/generate -H 'Content-Type: application/json' \\
       -d '{"prompt": "a red fox", "size": "128x128"}' -o fox.png
"""


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the HTTP API (OpenAI images compatible) with Ray Serve",
        description="Start Ray Serve with one deployment per replica pool and an HTTP router. Without "
        "--config: a local Ray instance serving tiny-flux on CPU with pools of 2 and 4 ranks.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a Serve config YAML (the same file works with `serve run`); default: the built-in CPU demo",
    )
    parser.add_argument("--host", default=None, help="bind address (default: the config's, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. auto or ray://head:10001); its nodes' `ray start` should set "
        "RAY_preload_python_modules=ray.serve._private.replica (a replica then skips importing it: 1.3-2.3 s on H100 "
        "hosts; cluster/README.md); "
        "default: start a local Ray instance, which gets it",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="expose Ray's Prometheus metrics (rayxdit_*, Serve's, Ray's) on http://HOST:N/metrics of the "
        "local Ray instance; with --address, set it on the cluster instead: ray start --metrics-export-port N "
        "(default: a port Ray picks, listed in its session files)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="what Ray Serve's controller, proxy and replicas print here (info: every request's access "
        "log too); all of it is in Ray's log files anyway (default: %(default)s)",
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging
    import time

    import ray
    from ray import serve

    from rayxdit.runtime.executor import forwarded_env
    from rayxdit.runtime.ray_executor import check_placeable
    from rayxdit.runtime.ray_start import init_ray
    from rayxdit.serve.app import APP_NAME, default_config, deploy, load_serve_file

    if args.config is not None and not args.config.is_file():
        raise UsageError(f"--config: {args.config} does not exist")
    config, http_options = load_serve_file(args.config) if args.config is not None else default_config()
    host = args.host or http_options.get("host") or config.host
    port = args.port or http_options.get("port") or config.port
    # This environment reaches every Serve replica (below), and the executors forward it to the ranks: a gated
    # model's HF_TOKEN works on a cluster joined with --address too.
    serve_env = {name: os.environ.get(name, value) for name, value in SERVE_ENV.items()}  # the user's win
    env = {**serve_env, **forwarded_env()}
    started_here = args.address is None and not os.environ.get("RAY_ADDRESS")  # Ray reads "" as unset too
    if args.metrics_port is not None and not started_here:
        raise UsageError(
            "--metrics-port applies to a Ray instance started here; on a cluster start each node with "
            "`ray start --metrics-export-port N`"
        )
    metrics = {"_metrics_export_port": args.metrics_port} if args.metrics_port is not None else {}
    if started_here:
        # Serve's controller warns of replicas that take more than 30 s to start: on a small machine a pool
        # replica loading its model does, by design (the local Ray instance inherits this environment).
        slowest = max(pool.startup_s for pool in config.pools)
        os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", str(int(max(120, 2 * slowest))))
    # A Ray started here inherits this process's environment, and every worker it starts inherits Ray's: the
    # environment needs no runtime_env, which would have Ray start every worker (each pool replica, each
    # rank) through its runtime-environment agent and never from the ones it keeps started (a Flux.1-dev
    # replica's restart on an H200 host, Serve's start to ready: 14.7 s with one, 10.6 s without; README "How
    # long a replica takes to start"). A cluster joined by address gets it as one.
    if started_here:
        os.environ.update(serve_env)
        # Its workers import Serve's replica module as they start, before any is given an actor (with the
        # pool's module too, a replica restarted on H100 hosts was ready 1.5-4.2 s sooner; what is preloaded
        # and why: config.SERVING_WORKER_PRELOAD). A cluster's nodes get it from their `ray start` (cluster/).
        os.environ.update(worker_preload_env())
    runtime_env = None if started_here else {"env_vars": env}
    init_ray(address=args.address, logging_level="warning", runtime_env=runtime_env, **metrics)
    # systemd, docker and Kubernetes stop a service with SIGTERM: stop as Ctrl-C does (this replaces the
    # crash report ray.init installs for it).
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C stops it, as the banner says, also when its parent left SIGINT ignored (a shell script's `&`, a
    # harness): a full test-suite run handed it on ignored and the server sat on through Ctrl-C (seen twice).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # `kill -USR1 <pid>`: every thread's stack to stderr, for an operator whose server seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    for pool in config.pools:  # a pool that can never be placed is refused now, not left pending
        warning = check_placeable(pool, started_here)
        if warning:
            print(f"rayxdit: warning: {warning} (unless an autoscaler adds such a node)", file=sys.stderr)
    logging_config = {
        "log_level": args.log_level.upper(),
        "enable_access_log": args.log_level in ("debug", "info"),
    }
    logging.getLogger("ray.serve").setLevel(args.log_level.upper())  # this process's own Serve messages
    try:
        serve.start(http_options={**http_options, "host": host, "port": port}, logging_config=logging_config)
    except (ray.exceptions.RayActorError, TimeoutError) as error:
        # serve.start waits 60 s for the proxy (Serve's HTTP_PROXY_TIMEOUT, not configurable); the
        # controller's own ready check (SERVE_ENV) was given 30 s of that.
        raise UsageError(
            f"Ray Serve's HTTP proxy did not start within Serve's 60 s ({type(error).__name__}; its log is in "
            "Ray's session directory, logs/serve/); the machine is likely too busy (is another job using "
            "every core?): free some cores and start again"
        ) from error
    print(
        f"rayxdit: deploying {len(config.pools)} pool(s): "
        + ", ".join(f"{pool.name} ({pool.ranks} ranks, {pool.engine.parallel})" for pool in config.pools),
        file=sys.stderr,
    )
    # Serve's config path (as `serve deploy`): the one that carries the application-level autoscaling
    # policy. On a joined cluster the environment goes with the application: a config deploy does not inherit
    # this job's runtime_env.
    deploy(config, runtime_env=runtime_env, logging_config=logging_config, timeout_s=READY_TIMEOUT_S)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    _wait_until_ready(f"http://{shown}:{port}/readyz", timeout_s=READY_TIMEOUT_S)
    from rayxdit.runtime.cards import model_card

    key = " -H 'Authorization: Bearer YOUR_KEY'" if config.router.api_keys else ""
    if all(model_card(pool.engine.model).limits.makes_video for pool in config.pools):
        example = (
            f"  curl -s http://{shown}:{port}/v1/videos -H 'Content-Type: application/json'{key} "
            f'-d \'{{"prompt": "a red fox", "frames": 9}}\'   # then GET /v1/videos/<id>, .../content'
        )
    else:
        example = (
            f"  curl -s http://{shown}:{port}/v1/generate -H 'Content-Type: application/json'{key} "
            f'-d \'{{"prompt": "a red fox"}}\' -o fox.png'
        )
    if key:
        example += "\n  (YOUR_KEY: one of the config's router.api_keys)"
    if started_here:
        example += (
            "\n  Ray CLI on this instance (ray list actors, ray job submit): set RAY_AUTH_MODE=token"
            " and RAY_ADDRESS=" + ray.get_runtime_context().gcs_address
        )
    print(
        f"rayxdit: serving on http://{shown}:{port}  (docs: /docs; Ctrl-C stops)\n"
        + example
        + (f"\n  metrics: http://{shown}:{args.metrics_port}/metrics" if args.metrics_port else ""),
        file=sys.stderr,
        flush=True,
    )
    try:
        while True:
            # Short sleeps: a signal the kernel hands to one of Ray's threads only sets a flag that the main
            # thread reads when it wakes; one long sleep left Ctrl-C/SIGTERM unanswered (seen in a test run).
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("rayxdit: stopping (in-flight requests are cancelled)", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _stop(serve, ray, APP_NAME, joined=not started_here)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the serve loop stops the application and Ray, and says so."""
    raise KeyboardInterrupt


SERVE_ENV = {
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}
"""Serve's handles probe a replica's queue within 0.1 s and warn when it takes longer, which a busy machine
(models loading on every core) does: the probe only orders replicas, so give it a second. Serve's
controller gives its HTTP proxy 5 s to say it is ready, and kills it after three misses, and ``serve.start``
then fails with the proxy's ActorDiedError: seen on two busy cores (a simulation on both, 2026-12-05), where
the proxy's start took longer. Nothing is served before it is ready, so waiting longer costs nothing."""
READY_TIMEOUT_S = 1800.0
"""How long `rayxdit serve` waits for every model to have a ready replica (loading a large model)."""


def _wait_until_ready(url: str, timeout_s: float) -> None:
    """Poll the router's /readyz until it answers 200; say what is still loading every 30 s."""
    import json
    import time
    import urllib.error
    import urllib.request

    began = last_note = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:  # 503: not ready yet
            state = json.loads(error.read() or b"{}")
            if time.monotonic() - last_note > 30:
                waiting = [name for name, ready in state.get("models", {}).items() if not ready]
                print(f"rayxdit: still loading {', '.join(waiting)}...", file=sys.stderr, flush=True)
                last_note = time.monotonic()
        except (urllib.error.URLError, OSError):
            pass  # the proxy is not listening yet
        if time.monotonic() - began > timeout_s:
            raise UsageError(f"the application was not ready within {timeout_s:.0f} s (see the Ray logs)")
        time.sleep(0.5)


def _stop(serve, ray, app_name: str, joined: bool) -> None:
    """On a cluster joined with --address, remove this application (other applications and Serve itself
    stay); a local Ray instance started here goes away whole, and with it every actor. Neither path asks
    Serve's controller to kill itself, which is what made a normal Ctrl-C print a failed task."""
    import contextlib

    with contextlib.suppress(Exception, KeyboardInterrupt):
        if joined:
            serve.delete(app_name)
    with contextlib.suppress(Exception, KeyboardInterrupt):
        ray.shutdown()


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayxdit",
        description="Serve and run diffusion transformers split over several GPUs (Ulysses, Ring, "
        "CFG parallel, PipeFusion) on Ray.",
    )
    subparsers = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_generate(subparsers)
    _add_serve(subparsers)
    _add_quarantine(subparsers)
    return parser


QUARANTINE_EPILOG = """examples:
  rayxdit quarantine list                      # nodes out of service on the cluster of RAY_ADDRESS / auto
  rayxdit quarantine return 4f2c...e1          # forget a node's record once its GPUs are fixed

A node leaves service when its worker groups fail `quarantine.failures` times within `quarantine.window_s`
(default 3 in 600 s) or a GPU reports a fatal fault (ECC, Xid): rayxdit drains it through Ray, as a spot
notice would, and Serve moves its replicas off it (`list` counts those still there). Ray cannot undrain a
node: after `return`, and once no replica is left on it, restart Ray on it (`ray stop; ray start
--address=HEAD:6379`; under KubeRay delete its pod) and it takes work again.
"""


def _add_quarantine(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quarantine",
        help="list the nodes taken out of service for failing hardware, or return one",
        description="The nodes a running rayxdit application took out of service (drained) because their "
        "GPUs kept failing; `return` forgets a node's record.",
        epilog=QUARANTINE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["list", "return"], help="list them, or return NODE")
    parser.add_argument("node", nargs="?", default=None, help="the node id to return (from `list`)")
    parser.add_argument(
        "--address", default="auto", help="the Ray cluster running the application (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_quarantine)


def _quarantine(args: argparse.Namespace) -> int:
    import json
    import time

    import ray
    from ray import serve

    from rayxdit.serve.app import APP_NAME
    from rayxdit.serve.state import STATE_DEPLOYMENT

    if (args.action == "return") != (args.node is not None):
        raise UsageError("give a NODE with `return` (and only with it): `rayxdit quarantine return NODE`")
    try:
        ray.init(address=args.address, logging_level="error")
    except ConnectionError as error:
        raise UsageError(f"no Ray cluster at --address {args.address} ({error})") from None
    try:
        state = serve.get_deployment_handle(STATE_DEPLOYMENT, app_name=APP_NAME)
        if args.action == "list":
            records = state.quarantined.remote().result(timeout_s=30)
        else:
            record = state.return_node.remote(args.node).result(timeout_s=30)
            records = [] if record is None else [record]
    except Exception as error:
        ray.shutdown()
        raise UsageError(f"no rayxdit application answered on this cluster ({error!r})") from None
    try:
        for record in records:
            record["replicas"] = serve_replicas_on(record["node"]) if record["alive"] else 0
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps(records, indent=2))
    elif args.action == "return" and not records:
        print(f"node {args.node} is not quarantined")
    elif not records:
        print("no node is out of service")
    for record in [] if args.json else records:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["since"]))
        state_now = "alive, drained" if record["alive"] else "gone from the cluster"
        verb = "returned" if args.action == "return" else "out of service"
        print(f"{record['node']}  {verb} since {since} ({state_now})")
        print(f"  GPUs {', '.join(record['gpus']) or '?'}; pools {', '.join(record['pools'])}")
        print(f"  why: {record['reason']}")
        if record["replicas"]:
            print(
                f"  {record['replicas']} Serve replica(s) still on it, moving off (each serves until its "
                "replacement runs): restarting its Ray now would fail their requests"
            )
        if args.action == "return" and record["alive"]:
            print(
                "  Ray cannot undrain a node: restart Ray on it (ray stop; ray start --address=HEAD:6379)"
                + (", once `rayxdit quarantine list` shows no replica on it" if record["replicas"] else "")
            )
    return 0


def serve_replicas_on(node: str) -> int | None:
    """How many Serve replicas still live on ``node`` (None when Ray's state API cannot say: no dashboard)."""
    from ray.util.state import list_actors

    try:
        actors = list_actors(filters=[("node_id", "=", node), ("state", "=", "ALIVE")], limit=10_000)
    except Exception:
        return None
    return sum(actor.class_name.startswith("ServeReplica") for actor in actors)


def main(argv: list[str] | None = None) -> int:
    from rayxdit.config import ConfigError
    from rayxdit.request import RequestError
    from rayxdit.runtime.executor import GroupError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, RequestError, UsageError) as error:
        print(f"rayxdit {args.handler.__name__.strip('_')}: error: {error}", file=sys.stderr)
        return 2
    except GroupError as error:
        print(f"rayxdit: a worker failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
