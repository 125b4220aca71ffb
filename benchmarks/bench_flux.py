"""Flux.1-dev denoising speed: one GPU (eager, compiled), diffusers' context parallelism, and rayxdit.

Transformer only, as the issue's reference numbers: batch 1, 512 text tokens, 28 steps, random bf16 weights
of the real architecture (speed does not depend on weight values). Every run goes through the same
denoising loop (``DiffusionAdapter.denoise``); what differs is how the transformer is split:

- ``single``: the plain diffusers model on one GPU (eager, or ``compile_repeated_blocks``);
- ``diffusers``: diffusers' ``ContextParallelConfig`` (ring or ulysses) over the whole GPU group, eager;
- ``rayxdit``: ``parallelize_flux`` over the mesh, compiled.

Each job runs in fresh processes (one per GPU, NCCL); results are appended to a JSON list whose records
carry the command, device, versions and the baseline measured in the same run.

    python benchmarks/bench_flux.py --out benchmarks/results/flux-dev-2xh200.json
    python benchmarks/bench_flux.py --preset tiny --steps 3 --resolutions 64 --out /tmp/smoke.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import source_commit  # noqa: E402
from benchmarks.models import FLUX_DEV  # noqa: E402
from rayxdit.config import ParallelConfig  # noqa: E402
from rayxdit.engine import denoise  # noqa: E402
from rayxdit.limits import ModelLimits, ResolvedRequest  # noqa: E402
from rayxdit.models.flux import FluxAdapter  # noqa: E402
from rayxdit.models.presets import TINY_FLUX, build_flux_pipeline  # noqa: E402
from rayxdit.models.running import RunningRequest  # noqa: E402
from rayxdit.parallel.cfg import branches_for_rank  # noqa: E402
from rayxdit.parallel.mesh import build_parallel_state  # noqa: E402
from rayxdit.request import GenerateRequest  # noqa: E402
from rayxdit.runtime.local import LocalExecutor  # noqa: E402

PRESETS = {"flux-dev": FLUX_DEV, "tiny": TINY_FLUX}


@dataclass(frozen=True)
class Job:
    """One model load in a fresh process group, timed at every resolution."""

    impl: str  # single | diffusers | rayxdit
    config: str  # mesh spec, or diffusers' "ring=2" / "ulysses=2"
    compile: bool
    cfg: bool = False  # true CFG (two branches per step)
    attention: str = "auto"  # rayxdit: kernel of sequence-parallel attention; single: SDPA backend
    gpus: int = 1
    resolutions: tuple[int, ...] | None = None  # None: every resolution of the run
    quantize: str | None = None  # fp8: torchao float8 in the transformer blocks (single or rayxdit)
    cache: tuple[float, ...] = ()  # First-Block Cache thresholds, each timed on the same loaded model

    @property
    def key(self) -> str:
        extras = (f"-{self.quantize}" if self.quantize else "") + (
            f"-cache{'+'.join(f'{c:g}' for c in self.cache)}" if self.cache else ""
        )
        return (
            f"{self.impl}-{self.config}-{'compile' if self.compile else 'eager'}-{self.attention}"
            f"{'-cfg' if self.cfg else ''}{extras}"
        )


@dataclass
class Settings:
    preset: str
    resolutions: list[int]
    steps: int
    warmup_steps: int
    dtype: str
    workdir: str
    profile_steps: int = 0
    repeats: int = 3


KERNEL_CATEGORIES = (
    ("nccl", ("nccl",)),
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "xmma", "triton_tem", "cublas")),
    ("copy", ("copy", "memcpy", "cat", "elementwise")),
    ("triton", ("triton",)),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(needle in lowered for needle in needles):
            return category
    return "other"


def running(adapter: FluxAdapter, req: ResolvedRequest) -> RunningRequest:
    """``req`` as the engine runs it: the model's defaults filled in (guidance), with the step-cache
    threshold it asks for (or the adapter's)."""
    resolved = dataclasses.replace(req, request=adapter.limits.resolve(req.request).request)
    return RunningRequest(resolved, cache_threshold=adapter.cache_threshold_for(req.request))


def profile_denoise(
    adapter: FluxAdapter, req: ResolvedRequest, conditions: dict, device: torch.device
) -> dict:
    """GPU kernel time by category over ``req.steps`` steps, against the wall time of those steps: where
    the time goes (compute vs communication) and how much of the communication is hidden."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        begin = time.perf_counter()
        denoise(adapter, running(adapter, req), conditions)
        synchronize(device)
        wall_ms = 1000 * (time.perf_counter() - begin)
    from torch.autograd import DeviceType

    # Device-side kernels only: CPU ops (aten::, c10d, record_function ranges such as nccl:all_to_all)
    # carry the time of the kernels they launch, and counting them too counted NCCL twice.
    kernels = [
        (event.name, event.time_range.start, event.time_range.end)
        for event in prof.events()
        if event.device_type == DeviceType.CUDA
    ]
    return kernel_breakdown(kernels, wall_ms, req.steps)


def kernel_breakdown(kernels: list[tuple[str, float, float]], wall_ms: float, steps: int) -> dict:
    """Per step: kernel time by category (summed, so overlapping streams may add up to more than the
    wall time), compute busy time (the union of non-NCCL kernel intervals: never more than the wall time)
    and exposed time, the wall time with no compute kernel running (communication not hidden, launch gaps).
    ``kernels``: (name, start_us, end_us) of device-side kernels."""
    totals: dict[str, float] = {}
    top: dict[str, float] = {}
    compute_intervals = []
    for name, start, end in kernels:
        ms = (end - start) / 1000
        category = kernel_category(name)
        totals[category] = totals.get(category, 0.0) + ms
        top[name[:90]] = top.get(name[:90], 0.0) + ms
        if category != "nccl":
            compute_intervals.append((start, end))
    busy_us, reach = 0.0, -math.inf
    for start, end in sorted(compute_intervals):  # the union of the intervals
        if end > reach:
            busy_us += end - max(start, reach)
            reach = end
    busy_ms = min(busy_us / 1000, wall_ms)
    return {
        "wall_ms_per_step": round(wall_ms / steps, 2),
        "kernel_ms_per_step": {
            k: round(v / steps, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
        },
        "compute_ms_per_step": round(busy_ms / steps, 2),
        "exposed_ms_per_step": round((wall_ms - busy_ms) / steps, 2),
        "top_kernels_ms_per_step": {
            k: round(v / steps, 3) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]
        },
    }


def sdpa_context(attention: str):
    """Pin plain SDPA (the single-GPU path) to one backend, or leave PyTorch's choice (``auto``)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }.get(attention)
    return nullcontext() if chosen is None else sdpa_kernel([chosen])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timer's edges on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_job(worker, job: Job, settings: Settings) -> list[dict] | None:
    """One job on one rank (the executor has joined the ranks in one process group)."""
    rank, world_size = worker.rank, worker.world_size
    device = torch.device(worker.device)
    dtype = getattr(torch, settings.dtype)
    sizes = PRESETS[settings.preset]
    begin = time.perf_counter()
    pipeline = build_flux_pipeline(sizes, device, dtype, with_text_encoders=False, with_vae=False)
    adapter = FluxAdapter(pipeline, limits=ModelLimits().updated(sizes.limits))
    if job.quantize:
        adapter.quantize(job.quantize)
    if job.impl == "rayxdit" or job.cache:  # the cache lives on the adapter's mesh (one rank: trivial)
        config = ParallelConfig.parse(job.config if job.impl == "rayxdit" else "")
        # No VAE in this benchmark (the transformer loop alone): nothing to split.
        adapter.parallelize(build_parallel_state(config, device), job.attention, vae_parallel=False)
    if job.cache:
        adapter.enable_step_cache(job.cache[0])
    elif job.impl == "diffusers":
        from diffusers import ContextParallelConfig

        degree_name, _, degree = job.config.partition("=")
        adapter.transformer.set_attention_backend("_native_cudnn" if device.type == "cuda" else "native")
        adapter.transformer.enable_parallelism(
            config=ContextParallelConfig(**{f"{degree_name}_degree": int(degree)})
        )
    if job.compile:
        adapter.compile()
    load_s = time.perf_counter() - begin

    records = []
    for resolution in job.resolutions or settings.resolutions:
        if resolution not in settings.resolutions:
            continue
        request = GenerateRequest(
            prompt="benchmark",
            height=resolution,
            width=resolution,
            steps=settings.steps,
            seed=0,
            negative_prompt="negative" if job.cfg else None,
            true_cfg_scale=4.0 if job.cfg else 1.0,
        )
        text_tokens = sizes.limits["max_sequence_length"]
        conditions = {}
        for branch in branches_for_rank(adapter.state.axis("cfg"), job.cfg):
            generator = torch.Generator(device).manual_seed(100 + branch)
            embeds = torch.randn(
                1,
                text_tokens,
                sizes.transformer["joint_attention_dim"],
                generator=generator,
                device=device,
                dtype=dtype,
            )
            pooled = torch.randn(
                1, sizes.transformer["pooled_projection_dim"], generator=generator, device=device, dtype=dtype
            )
            conditions[branch] = adapter.condition(embeds, pooled)
        warm = ResolvedRequest(
            request.model_copy(update={"steps": settings.warmup_steps}),
            resolution,
            resolution,
            settings.warmup_steps,
        )
        with torch.inference_mode(), sdpa_context(job.attention if job.impl == "single" else "auto"):
            begin = time.perf_counter()
            denoise(adapter, running(adapter, warm), conditions)
            synchronize(device)
            warmup_s = time.perf_counter() - begin
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timed = {}  # threshold (None: no cache) -> (latents, seconds of each repeat, steps skipped)
            for threshold in job.cache or (None,):
                run = running(
                    adapter, adapter.resolve(request.model_copy(update={"cache_threshold": threshold}))
                )
                repeats = []
                for _ in range(settings.repeats):
                    begin = time.perf_counter()
                    latents = denoise(adapter, run, conditions)
                    synchronize(device)
                    repeats.append(time.perf_counter() - begin)
                cache = adapter.step_cache
                skipped = (cache.skipped_steps, [round(c, 4) for c in cache.changes]) if threshold else None
                timed[threshold] = (latents, repeats, skipped)
            profile = None
            if settings.profile_steps and device.type == "cuda":
                steps = settings.profile_steps
                profiled = ResolvedRequest(
                    request.model_copy(update={"steps": steps}), resolution, resolution, steps
                )
                profile = profile_denoise(adapter, profiled, conditions, device)
        peak = torch.tensor(
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0, device=device
        )
        if world_size > 1:
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        for threshold, (latents, repeats, skipped) in timed.items() if rank == 0 else ():
            path = Path(settings.workdir) / f"{job.key}-{threshold}-{resolution}.pt"
            torch.save(latents.float().cpu(), path)
            seconds = statistics.median(repeats)
            records.append(
                {
                    "impl": job.impl,
                    "config": job.config,
                    "gpus": job.gpus,
                    "resolution": resolution,
                    "steps": settings.steps,
                    "cfg": job.cfg,
                    "compile": job.compile,
                    "attention": job.attention,
                    "quantize": job.quantize,
                    "cache_threshold": threshold,
                    "cached_steps": skipped[0] if skipped else None,
                    "cache_changes": skipped[1] if skipped else None,
                    "seconds": round(seconds, 4),
                    "repeats_s": [round(s, 4) for s in repeats],
                    "ms_per_step": round(1000 * seconds / settings.steps, 2),
                    "peak_mem_gib": round(peak.item(), 2),
                    "warmup_s": round(warmup_s, 1),
                    "load_s": round(load_s, 1),
                    "image_tokens": latents.shape[1],
                    "text_tokens": text_tokens,
                    "latents": str(path),
                    **({"profile": profile} if profile else {}),
                }
            )
        # A job's second resolution reuses the loaded (and compiled) model.
    return records if rank == 0 else None


def versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "ray"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        info["cudnn"] = torch.backends.cudnn.version()
    info["rayxdit_commit"] = source_commit()
    return info


def gpu_provenance(script: str, argv: list[str] | None) -> dict:
    """What a result run on this machine's GPU (or CPU) says of its making: the command (``script`` and its
    arguments), the device, the versions (the commit among them) and the date."""
    return {
        "command": " ".join(["python", script, *(argv if argv is not None else sys.argv[1:])]),
        "device": device_name(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"


def default_jobs(gpus: int) -> list[Job]:
    """Most informative first: a time budget cuts from the end."""
    jobs = [Job("single", "single", compile=True)]
    if gpus >= 2:
        jobs += [
            Job("rayxdit", "ulysses=2", compile=True, gpus=2),
            Job("rayxdit", "ring=2", compile=True, gpus=2),
            Job("rayxdit", "cfg=2", compile=True, cfg=True, gpus=2, resolutions=(1024,)),
            Job("single", "single", compile=True, cfg=True, resolutions=(1024,)),
            Job("diffusers", "ring=2", compile=False, gpus=2),
            Job("diffusers", "ulysses=2", compile=False, gpus=2),
            # diffusers' context parallelism compiled too, where it compiles (a failure is reported, and the
            # run exits non-zero after writing every other job's numbers)
            Job("diffusers", "ring=2", compile=True, gpus=2),
            Job("diffusers", "ulysses=2", compile=True, gpus=2),
            # PipeFusion: 2 stages, 2 patches, 1 synchronous warm-up step (then one-step-old keys/values).
            Job("rayxdit", "pipefusion=2", compile=True, gpus=2),
        ]
    if gpus >= 4:
        jobs += [
            Job("rayxdit", "ulysses=4", compile=True, gpus=4),
            Job("rayxdit", "ulysses=2,ring=2", compile=True, gpus=4),
            Job("rayxdit", "cfg=2,ring=2", compile=True, cfg=True, gpus=4, resolutions=(1024,)),
        ]
    if gpus >= 8:
        jobs += [
            Job("rayxdit", "ulysses=8", compile=True, gpus=8),
            Job("rayxdit", "ulysses=4,ring=2", compile=True, gpus=8),
            Job("rayxdit", "ulysses=2,ring=4", compile=True, gpus=8),
        ]
    jobs.append(Job("single", "single", compile=False))
    if torch.cuda.is_available():  # the speed stack (fp8: GPU only), alone and with the best exact split
        # Thresholds for these random weights, whose first block changes 52-65% a step (a trained model's
        # few percent would want ~0.05-0.2): benchmarks/results/speed-flux-dev-1xh200-1024-cache.json.
        jobs += [
            Job("single", "single", compile=True, quantize="fp8"),
            Job("single", "single", compile=True, quantize="fp8", cache=(0.6, 0.7)),
        ]
        if gpus >= 2:
            jobs.append(Job("rayxdit", "ulysses=2", compile=True, gpus=2, quantize="fp8", cache=(0.7,)))
    return jobs


def parse_job(text: str) -> Job:
    """``impl:config[:compile|eager][:cfg][:attention][:fp8][:cache=T1/T2...]``, e.g.
    ``rayxdit:ring=2:compile:cudnn`` or ``single:single:fp8:cache=0.05/0.1``."""
    impl, config, *flags = text.split(":")
    compile_ = "eager" not in flags
    cfg = "cfg" in flags
    quantize = "fp8" if "fp8" in flags else None
    cache = next((tuple(float(t) for t in f[6:].split("/")) for f in flags if f.startswith("cache=")), ())
    attention = next((f for f in flags if f in ("auto", "cudnn", "flash", "efficient")), "auto")
    gpus = (
        1
        if impl == "single"
        else (ParallelConfig.parse(config).world_size if impl == "rayxdit" else int(config.partition("=")[2]))
    )
    return Job(impl, config, compile_, cfg, attention, gpus, quantize=quantize, cache=cache)


def add_comparisons(records: list[dict]) -> None:
    """rel_err against the single-GPU eager output (else the first single-GPU output) of the same
    resolution and CFG setting; speedups against the best single-GPU compiled time of this run."""
    for record in records:
        peers = [  # the exact single-GPU runs: fp8 and cached ones are compared, never the baseline
            r
            for r in records
            if r["resolution"] == record["resolution"]
            and r["cfg"] == record["cfg"]
            and r["impl"] == "single"
            and not r.get("quantize")
            and not r.get("cache_threshold")
        ]
        reference = next((r for r in peers if not r["compile"]), peers[0] if peers else None)
        if reference is not None and reference is not record:
            ours, ref = torch.load(record["latents"]), torch.load(reference["latents"])
            record["rel_err"] = float((ours - ref).norm() / ref.norm())
            record["rel_err_reference"] = f"single {'compile' if reference['compile'] else 'eager'}"
        else:
            record["rel_err"] = 0.0 if reference is record else None
        compiled = [r["seconds"] for r in peers if r["compile"]]
        record["baseline_seconds"] = min(compiled) if compiled else None
        record["speedup_vs_single_compile"] = (
            round(record["baseline_seconds"] / record["seconds"], 3) if compiled else None
        )


def print_table(records: list[dict]) -> None:
    header = (
        f"{'impl':9} {'config':20} {'gpus':>4} {'res':>5} {'cfg':>3} {'comp':>4} {'attn':>6} "
        f"{'seconds':>8} {'ms/step':>8} {'speedup':>7} {'rel_err':>9} {'mem GiB':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        speedup = f"{r['speedup_vs_single_compile']:.2f}x" if r.get("speedup_vs_single_compile") else "-"
        rel = f"{r['rel_err']:.2e}" if r.get("rel_err") is not None else "-"
        variant = r["config"] + (f" {r['quantize']}" if r.get("quantize") else "")
        if r.get("cache_threshold"):
            variant += f" c{r['cache_threshold']:g}:{r['cached_steps']}"
        print(
            f"{r['impl']:9} {variant:20} {r['gpus']:>4} {r['resolution']:>5} {'y' if r['cfg'] else 'n':>3} "
            f"{'y' if r['compile'] else 'n':>4} {r['attention']:>6} {r['seconds']:8.3f} {r['ms_per_step']:8.1f} "
            f"{speedup:>7} {rel:>9} {r['peak_mem_gib']:7.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flux-dev")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (compiles)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument(
        "--jobs",
        nargs="*",
        default=None,
        help="impl:config[:eager][:cfg][:attention] (default: every job that fits the GPUs)",
    )
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after timing, profile this many steps on rank 0 (GPU kernel time by category)",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=1e9,
        help="start no new job after this many seconds (the rest is reported as skipped)",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (a list of records)")
    args = parser.parse_args(argv)

    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    jobs = [parse_job(j) for j in args.jobs] if args.jobs else default_jobs(max(gpus, 1 if gpus else 2))
    if not torch.cuda.is_available():
        gpus = max(job.gpus for job in jobs)
    workdir = tempfile.mkdtemp(prefix="rayxdit-bench-")
    settings = Settings(
        args.preset,
        args.resolutions,
        args.steps,
        args.warmup_steps,
        dtype,
        workdir,
        args.profile_steps,
        args.repeats,
    )
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "dtype": dtype,
        "batch": 1,
    }
    print(json.dumps(meta), flush=True)
    started = time.perf_counter()
    records: list[dict] = []
    failed = []
    for job in jobs:
        if job.gpus > gpus:
            print(f"skip {job.key}: needs {job.gpus} GPUs", flush=True)
            continue
        if time.perf_counter() - started > args.time_budget_s:
            print(f"skip {job.key}: time budget spent", flush=True)
            continue
        begin = time.perf_counter()
        try:
            result = run_job(job, settings)
        except Exception as error:  # one failing job must not lose the others' numbers
            print(f"FAILED {job.key}: {str(error)[-3000:]}", flush=True)
            failed.append(job.key)
            continue
        for record in result:
            print(
                f"{job.key} {record['resolution']}px: {record['seconds']:.3f} s "
                f"(warmup {record['warmup_s']} s, load {record['load_s']} s, job {time.perf_counter() - begin:.0f} s)",
                flush=True,
            )
        records.extend(result)
        _write(args.out, records, meta)
    add_comparisons(records)
    _write(args.out, records, meta)
    print_table(records)
    for record in records:
        if "profile" in record:
            print(
                f"profile {record['impl']} {record['config']} {record['resolution']}px: {json.dumps(record['profile'])}"
            )
    if failed:  # the numbers of the others are written; the run still says it is incomplete
        print(f"{len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_job(job: Job, settings: Settings) -> list[dict]:
    """A job on fresh processes, one per GPU (single-GPU jobs too: a clean allocator and compile cache)."""
    with LocalExecutor(job.gpus, in_process=False, call_timeout_s=1800) as executor:
        return executor.collective_rpc(_run_job, (job, settings))[0]


def _write(path: Path, records: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**{k: v for k, v in record.items() if k != "latents"}, **meta} for record in records]
    path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
