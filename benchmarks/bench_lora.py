"""What per-request LoRA adapters cost: a request with its adapter resident against the plain model, a swap
between resident adapters, a load from host memory, and whether a swap makes torch.compile trace again.

One engine (one GPU, the full pipeline: text encoders, transformer, VAE) serves adapters from a directory of
random rank-R LoRAs on every attention and MLP linear layer of the transformer blocks (rank 64 on Flux.1-dev:
262 M parameters, as in issue 27). The plain model's request time is measured in the same run (the baseline):

    python benchmarks/bench_lora.py --out benchmarks/results/lora-flux-dev-1xh200.json
    python benchmarks/bench_lora.py --model tiny-flux --size 64 --steps 2 --rank 4 --no-compile --out /tmp/x.json

Adapters are fused into the weights (``rayxdit/models/lora.py``): a request whose adapters are already applied
runs the plain model's kernels on other weights; a change of adapters restores the touched weights from exact
copies and adds the new updates (``swap``); an adapter not on the GPU is first copied there from host memory
(``host load``), or read from disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_flux import device_name, gpu_provenance
from rayxdit.config import EngineConfig
from rayxdit.engine import Engine, pick_device
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest, LoraChoice

ADAPTERS = ("ink", "sketch", "glow")
TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)
"""Every attention and MLP linear layer of Flux's double and single blocks."""


def write_adapters(engine: Engine, folder: Path, rank: int) -> int:
    """Random rank-``rank`` LoRAs in diffusers' format; returns the parameters of one."""
    transformer = engine.adapter.transformer
    generator = torch.Generator().manual_seed(0)
    parameters = 0
    for name in ADAPTERS:
        layers = {}
        for module_name, module in transformer.named_modules():
            in_blocks = module_name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            if not (in_blocks and module_name.endswith(TARGETS) and isinstance(module, torch.nn.Linear)):
                continue
            down = torch.randn((rank, module.in_features), generator=generator) / module.in_features**0.5
            up = torch.randn((module.out_features, rank), generator=generator) * 1e-3
            layers[f"{module_name}.lora_A.weight"] = down.to(torch.bfloat16)
            layers[f"{module_name}.lora_B.weight"] = up.to(torch.bfloat16)
        parameters = sum(tensor.numel() for tensor in layers.values())
        type(engine.adapter.pipeline).save_lora_weights(
            folder, weight_name=f"{name}.safetensors", transformer_lora_layers=layers
        )
    return parameters


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(action) -> float:
    _synchronize()
    start = time.perf_counter()
    action()
    _synchronize()
    return time.perf_counter() - start


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="benchmarks.models:FLUX_DEV", help="model name or preset")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rank", type=int, default=64, help="adapter rank")
    parser.add_argument("--repeats", type=int, default=3, help="requests per measurement (median)")
    parser.add_argument("--swaps", type=int, default=8, help="swaps and host loads measured (median)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run eager")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="rayxdit-bench-loras-"))
    config = EngineConfig(
        model=args.model,
        compile=args.compile,
        lora_sources=(str(folder),),
        lora_max_rank=args.rank,
        lora_resident=2,  # three adapters through two slots: the third is a host load
    )
    began = time.perf_counter()
    # The GPU when there is one (ParallelState.single() alone is the CPU: the tests' default).
    engine = Engine(config, ParallelState.single(pick_device(0)))
    print(f"engine ready in {time.perf_counter() - began:.1f} s on {device_name()}", flush=True)
    parameters = write_adapters(engine, folder, args.rank)
    print(f"adapters written ({parameters / 1e6:.0f} M parameters each)", flush=True)
    request = GenerateRequest(
        prompt="a lighthouse at dusk", height=args.size, width=args.size, steps=args.steps
    )

    def run(*names: str) -> dict:
        chosen = tuple(LoraChoice(name=name) for name in names)
        return engine.generate(request.model_copy(update={"loras": chosen}), output="latent").timings

    def request_seconds(*names: str) -> list[float]:
        return [timed(lambda: run(*names)) for _ in range(args.repeats)]

    def say(what: str, values) -> None:
        print(f"{time.perf_counter() - began:7.1f} s  {what}: {values}", flush=True)

    say("first plain request (compiles)", round(timed(run), 3))
    graphs_compiled = unique_graphs()
    plain = request_seconds()
    say("plain", plain)
    first = timed(lambda: run("ink"))  # read from disk, copied to the GPU, fused
    say("first with an adapter", round(first, 3))
    resident = request_seconds("ink")
    say("resident adapter", resident)
    run("sketch")  # both resident now
    loras = engine.loras
    swaps = [timed(lambda i=i: loras.apply([LoraChoice(name=ADAPTERS[i % 2])])) for i in range(args.swaps)]
    say("swaps", swaps)
    for name in ADAPTERS:  # the third is read from disk once; cycling three through two slots then always
        loras.apply([LoraChoice(name=name)])  # misses on the GPU and hits in host memory
    hits_before = loras.counts["host_loads"]
    host_loads = [
        timed(lambda i=i: loras.apply([LoraChoice(name=ADAPTERS[i % 3])])) for i in range(args.swaps)
    ]
    host_hits = loras.counts["host_loads"] - hits_before
    say("host loads", host_loads)
    stacked = request_seconds("ink", "glow")
    after_swaps = request_seconds("ink")
    plain_again = request_seconds()
    graphs_after = unique_graphs()
    say("stacked, after swaps, plain again", (stacked, after_swaps, plain_again))
    loras.apply([])
    exact = all(
        torch.equal(loras.targets[key].module().weight, original) for key, original in loras.originals.items()
    )

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 4)

    record = {
        "benchmark": "lora",
        **gpu_provenance("benchmarks/bench_lora.py", argv),
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "compile": args.compile,
        "rank": args.rank,
        "adapter_parameters": parameters,
        "adapter_layers": len(next(iter(loras.on_host.values())).layers) if loras.on_host else None,
        "original_copies_gib": round(sum(t.nbytes for t in loras.originals.values()) / 2**30, 3),
        "baseline_plain_request_s": median(plain),
        "plain_request_s": plain,
        "first_request_with_adapter_s": round(first, 4),
        "resident_adapter_request_s": resident,
        "resident_slowdown": round(statistics.median(resident) / statistics.median(plain) - 1, 4),
        "stacked_request_s": stacked,
        "request_after_swaps_s": after_swaps,
        "plain_after_swaps_s": plain_again,
        "swap_s": swaps,
        "swap_median_s": median(swaps),
        "host_load_and_swap_s": host_loads,
        "host_load_median_s": median(host_loads),
        "host_loads_from_host_memory": host_hits,
        "unique_graphs_after_first_request": graphs_compiled,
        "unique_graphs_after_swaps": graphs_after,
        "recompiled": graphs_after != graphs_compiled,
        "base_weights_exact_after_swaps": exact,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if torch.cuda.is_available()
        else None,
        "counts": dict(loras.counts),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, (list, dict))}, indent=2))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
