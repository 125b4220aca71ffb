"""Write a recipe built in code (``package.module:NAME``, a ``FluxSizes``) as a diffusers directory.

A recipe draws its weights when a rank loads it, so a replica of it never reads a checkpoint and a node keeps
no host copy of it. Its export holds the very weights it draws on ``--device`` in ``--dtype``, with its
serving limits (``rayxdit.json``): ``--model DIR`` there serves the images ``--model RECIPE`` does, from a
checkpoint, which is what benchmarks of restarts and checkpoint reads serve.

    python3 benchmarks/export_recipe.py benchmarks.models:FLUX_DEV /tmp/fluxdev    # GPU, bf16: ~32 GB
    python3 benchmarks/bench_serve.py --model /tmp/fluxdev --parallel ulysses=1 --compile --restarts 4 ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayxdit.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="the recipe, package.module:NAME (e.g. benchmarks.models:FLUX_DEV)")
    parser.add_argument("out", type=Path, help="the directory to write (new, or empty)")
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="where the weights are drawn (default: %(default)s, the GPU if there is one); the draws differ "
        "between the two, so export on the kind of device that will serve it",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="the weights' type (default: %(default)s: bfloat16 on a GPU, float32 on a CPU, as serving's)",
    )
    args = parser.parse_args(argv)
    try:
        return export(args)
    except ConfigError as error:
        print(f"export_recipe: error: {error}", file=sys.stderr)
        return 2


def export(args: argparse.Namespace) -> int:
    import torch

    from rayxdit.models.registry import check_export, export_recipe, resolve_dtype

    check_export(args.model, args.out)  # before the long draw
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: this machine has no GPU torch can use (--device cpu draws on the CPU)"
        )
    device = torch.device("cuda" if cuda else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    print(
        f"drawing {args.model}'s weights on {device} in {dtype_name}, then writing {args.out}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    written = export_recipe(args.model, args.out, device, dtype)
    print(
        f"wrote {args.out} ({written / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s; serve it with "
        f"--model {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
