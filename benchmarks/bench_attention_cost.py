"""The attention term of a model's request cost, measured: one denoising step's time at two sizes.

Routing prices a step of ``s`` megapixels (width x height x frames / 1e6) at ``s x (1 + a x s) / (1 + a)`` cost
units (``rayxdit.serve.routing.sample_cost``): attention grows with the square of the sequence, the rest of a
step linearly. With step times ``t1`` and ``t2`` at ``m1`` and ``m2`` megapixels, ``r = (t2 / m2) / (t1 / m1)``
and ``a = (r - 1) / (m2 - r x m1)``. This times each model's transformer alone (batch 1, the text tokens its
pipeline feeds it: 512 for Flux and Wan, 77 CLIP + 256 T5 for SD3; seeded random weights of the real
architecture: speed does not depend on their values), compiled block by block (``compile_repeated_blocks``) as the pools
serve it, the median of repeats; Flux.1-dev runs beside as the baseline, whose term is declared from
``bench_flux.py``'s 28-step loops (``FLUX_ATTENTION_COST``). The JSON is written after each model, so a run
cut short keeps the models it finished.

    python benchmarks/bench_attention_cost.py --out benchmarks/results/attention-cost-1xh200.json
    python benchmarks/bench_attention_cost.py --preset tiny --out /tmp/smoke.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import write_result  # noqa: E402
from benchmarks.bench_flux import gpu_provenance, synchronize  # noqa: E402
from benchmarks.models import FLUX_DEV, SD35_LARGE, WAN_14B  # noqa: E402
from rayxdit.limits import request_work  # noqa: E402
from rayxdit.models.base import compile_repeated_blocks  # noqa: E402
from rayxdit.models.families import FAMILIES  # noqa: E402
from rayxdit.models.presets import TINY_FLUX, TINY_SD3_TRANSFORMER, TINY_WAN_TRANSFORMER  # noqa: E402


@dataclass(frozen=True)
class Subject:
    """A transformer to time: its family (whose declared term the result is set beside), its diffusers
    class and config, the two sizes (width, height, frames) it is timed at and the text tokens it attends to
    beside the image's (a constant share of each step, so it shapes the measured term a little)."""

    name: str
    pipeline_class: str
    transformer_class: str
    config: dict
    sizes: tuple[tuple[int, int, int], tuple[int, int, int]]
    text_tokens: int = 512


PRESETS = {
    "gpu": [
        Subject("flux-dev", "FluxPipeline", "FluxTransformer2DModel", FLUX_DEV.transformer,
                ((1024, 1024, 1), (2048, 2048, 1))),
        Subject("wan2.1-t2v-14b", "WanPipeline", "WanTransformer3DModel", WAN_14B,
                ((832, 480, 81), (1280, 720, 81))),
        Subject("sd3.5-large", "StableDiffusion3Pipeline", "SD3Transformer2DModel", SD35_LARGE,
                ((1024, 1024, 1), (2048, 2048, 1)), text_tokens=77 + 256),
    ],
    "tiny": [
        Subject("tiny-flux", "FluxPipeline", "FluxTransformer2DModel", TINY_FLUX.transformer,
                ((64, 64, 1), (128, 128, 1))),
        Subject("tiny-wan", "WanPipeline", "WanTransformer3DModel", TINY_WAN_TRANSFORMER,
                ((32, 32, 5), (64, 64, 5))),
        Subject("tiny-sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel", TINY_SD3_TRANSFORMER,
                ((64, 64, 1), (128, 128, 1)), text_tokens=16 + 13),
    ],
}  # fmt: skip


def attention_term(m1: float, t1: float, m2: float, t2: float) -> float:
    """The ``a`` that prices the two measured steps as they took (see the module docstring)."""
    ratio = (t2 / m2) / (t1 / m1)
    return (ratio - 1) / (m2 - ratio * m1)


def inputs(subject: Subject, size: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> dict:
    """The transformer's inputs for one image (or video) of ``size``, as its pipeline makes them."""
    width, height, frames = size
    config = subject.config
    if subject.transformer_class == "FluxTransformer2DModel":
        rows, columns = height // 16, width // 16  # VAE 8x, then 2x2 patches packed into channels
        ids = torch.stack(
            torch.meshgrid(*(torch.arange(float(n)) for n in (1, rows, columns)), indexing="ij"), -1
        ).reshape(-1, 3)
        return dict(
            hidden_states=torch.randn(1, rows * columns, config["in_channels"], device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(
                1, subject.text_tokens, config["joint_attention_dim"], device=device, dtype=dtype
            ),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
            timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
            img_ids=ids.to(device=device, dtype=dtype),
            txt_ids=torch.zeros(subject.text_tokens, 3, device=device, dtype=dtype),
            guidance=torch.full((1,), 3.5, device=device, dtype=dtype)
            if config.get("guidance_embeds")
            else None,
            return_dict=False,
        )
    if subject.transformer_class == "SD3Transformer2DModel":
        return dict(
            hidden_states=torch.randn(
                1, config["in_channels"], height // 8, width // 8, device=device, dtype=dtype
            ),
            encoder_hidden_states=torch.randn(
                1, subject.text_tokens, config["joint_attention_dim"], device=device, dtype=dtype
            ),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
            timestep=torch.full((1,), 500.0, device=device, dtype=dtype),
            return_dict=False,
        )
    latent_frames = (frames - 1) // 4 + 1  # the VAE's 4x in time, 8x in space
    return dict(
        hidden_states=torch.randn(
            1, config["in_channels"], latent_frames, height // 8, width // 8, device=device, dtype=dtype
        ),
        timestep=torch.full((1,), 500, device=device, dtype=torch.long),
        encoder_hidden_states=torch.randn(
            1, subject.text_tokens, config["text_dim"], device=device, dtype=dtype
        ),
        return_dict=False,
    )


def time_subject(
    subject: Subject, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict:
    import diffusers

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = getattr(diffusers, subject.transformer_class)(**subject.config).eval()
    finally:
        torch.set_default_dtype(default)
    if args.compile:
        compile_repeated_blocks(model, fullgraph=True)
    rows = []
    for size in subject.sizes:
        feed = inputs(subject, size, device, dtype)
        with torch.inference_mode():
            for _ in range(args.warmup_steps):
                model(**feed)
            synchronize(device)
            repeats = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                for _ in range(args.steps):
                    model(**feed)
                synchronize(device)
                repeats.append((time.perf_counter() - began) / args.steps)
        rows.append(
            {
                "size": "x".join(map(str, size)),
                "megapixels": round(request_work(*size), 4),
                "seconds_per_step": round(statistics.median(repeats), 5),
                "repeats_s": [round(seconds, 5) for seconds in repeats],
            }
        )
        print(f"{subject.name} {rows[-1]['size']}: {rows[-1]['seconds_per_step']:.4f} s a step", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    (first, second) = rows
    measured = attention_term(
        first["megapixels"], first["seconds_per_step"], second["megapixels"], second["seconds_per_step"]
    )
    return {
        "model": subject.name,
        "pipeline_class": subject.pipeline_class,
        "text_tokens": subject.text_tokens,
        "steps": rows,
        "time_ratio": round(second["seconds_per_step"] / first["seconds_per_step"], 4),
        "pixel_ratio": round(second["megapixels"] / first["megapixels"], 4),
        "attention_cost_per_megapixel": round(measured, 5),
        "declared": FAMILIES[subject.pipeline_class].limits.attention_cost_per_megapixel,
        "compile": args.compile,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="gpu", help="gpu: the real architectures"
    )
    parser.add_argument("--models", nargs="*", help="names of the preset's subjects (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="transformer calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per size (median)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed calls first (compiles)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager (default on CPU)")
    parser.add_argument("--out", type=Path, required=True, help="where the result JSON goes")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.compile = False
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    subjects = [s for s in PRESETS[args.preset] if not args.models or s.name in args.models]
    if not subjects:
        parser.error(f"--models: none of {args.models} in preset {args.preset}")
    document = {
        **gpu_provenance("benchmarks/bench_attention_cost.py", argv),
        "dtype": str(dtype).removeprefix("torch."),
        "results": [],
    }
    results = document["results"]
    for subject in subjects:
        results.append(time_subject(subject, args, device, dtype))
        write_result(args.out, document)  # after each subject: a run cut short keeps what it measured
    for result in results:
        print(
            f"{result['model']}: {result['time_ratio']}x the time for {result['pixel_ratio']}x the pixels, "
            f"attention term {result['attention_cost_per_megapixel']} (declared {result['declared']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
