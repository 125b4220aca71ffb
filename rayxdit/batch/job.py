"""``python -m rayxdit.batch``: generate a dataset of images from a table of prompts.

    python -m rayxdit.batch --input prompts.jsonl --output out/ --model tiny-flux --accelerator cpu
    ray job submit --working-dir . -- python -m rayxdit.batch --input prompts.parquet --output /data/out \\
        --model black-forest-labs/FLUX.1-dev --parallel ulysses=2 --pools 4

Ray Data reads and validates the rows (pyarrow), the driver plans what is left to do, and a pool of actors,
each driving one multi-GPU worker group in its own placement group, generates the images. Finished rows
stream back to the driver, which writes manifest parts as they come; a rerun of the same command after a
crash or Ctrl-C continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rayxdit.batch.rows import RECORDED_COLUMNS
from rayxdit.config import WorkerGroupConfig, add_engine_arguments

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CPU_RANK_CPUS = 0.5
"""Logical CPUs per rank on the CPU by default: ranks share cores anyway, and a 2-core machine then hosts a
2-rank group with room left for Ray Data."""
ROW_COLUMNS = (*RECORDED_COLUMNS, "status", "error", "request")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rayxdit.batch",
        description="Generate one image per input row with Ray Data (one video with a video model); writes "
        "OUTPUT/images/<id>.png (OUTPUT/videos/<id>.mp4) and OUTPUT/manifest.parquet. Rerun the same command "
        "to resume after a crash or Ctrl-C.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        required=True,
        help="prompts: .parquet, .jsonl or .csv with a 'prompt' column "
        "and optional id, seed, size (WxH), steps, scheduler, loras (JSON or name:scale,...; with --lora-source), negative_prompt, guidance, true_cfg_scale; image and "
        "mask (paths under the input's directory, or URLs) and strength for img2img and inpainting; "
        "control_image (a path or URL), controlnet and controlnet_scale with --controlnet; ip_adapter_image "
        "and ip_adapter_scale with --ip-adapter; for video models (Wan) frames",
    )
    parser.add_argument("--output", required=True, type=Path, help="output directory (created if missing)")
    parser.add_argument("--pools", type=int, default=1, help="worker groups generating at once (default: 1)")
    parser.add_argument(
        "--accelerator",
        choices=["gpu", "cpu"],
        default=None,
        help="gpu: one GPU per rank; cpu: gloo on CPU (default: gpu if the cluster has GPUs)",
    )
    parser.add_argument(
        "--cpus-per-rank",
        type=float,
        default=None,
        help=f"logical CPUs reserved per rank (default: 1 with GPUs, {CPU_RANK_CPUS} on the CPU, so that a "
        "2-core machine hosts a 2-rank group)",
    )
    add_engine_arguments(
        parser.add_argument_group("engine (how each worker group loads and runs the model)"),
        defaults={"model": "tiny-flux", "parallel": WorkerGroupConfig.DEFAULT_PARALLEL},
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=2,
        help="tries per row when a worker group fails; then the row is recorded as failed",
    )
    parser.add_argument("--rows-per-part", type=int, default=16, help="finished rows per manifest part file")
    parser.add_argument(
        "--request-timeout-s", type=float, default=1800.0, help="a row running longer is a hang"
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else a local one)"
    )
    return parser


def normalize_batch(batch, limits, base_dir=None, controlnets=(), ip_adapter=False):
    """Ray Data stage: raw input rows -> rows with id, seed, status (``invalid`` + reason when bad) and the
    validated request (input images read from ``base_dir``, the input file's directory)."""
    import pyarrow as pa

    from rayxdit.batch.rows import normalize

    rows = [normalize(row, limits, base_dir, controlnets, ip_adapter) for row in batch.to_pylist()]
    return pa.Table.from_pylist([{key: row[key] for key in ROW_COLUMNS} for row in rows], schema=row_schema())


def row_schema():
    """Normalized input rows: the manifest's input fields plus the validated request (JSON)."""
    import pyarrow as pa

    from rayxdit.batch.manifest import SCHEMA

    return pa.schema(
        [SCHEMA.field(name) for name in ROW_COLUMNS if name != "request"] + [("request", pa.string())]
    )


def read_rows(
    path: str, limits, controlnets: tuple[str, ...] = (), ip_adapter: bool = False
) -> list[dict[str, Any]]:
    """Every input row, normalized, in input order, each id once (duplicate rows would be the same image)."""
    import ray.data

    from rayxdit.batch.rows import input_format

    kind = input_format(path)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # manifest in input order
    reader = {"parquet": ray.data.read_parquet, "json": ray.data.read_json, "csv": ray.data.read_csv}[kind]
    # Paths in image/mask columns are relative to the input file's directory (on a local or mounted disk).
    base_dir = None if "://" in path else Path(path).resolve().parent
    dataset = reader(path).map_batches(
        normalize_batch,
        fn_kwargs={
            "limits": limits,
            "base_dir": base_dir,
            "controlnets": controlnets,
            "ip_adapter": ip_adapter,
        },
        batch_format="pyarrow",
    )
    seen: dict[str, dict[str, Any]] = {}
    for row in dataset.iter_rows():
        seen.setdefault(row["id"], dict(row))
    return list(seen.values())


def plan(
    rows: list[dict[str, Any]], output: Path, run_id: str, video: bool = False
) -> tuple[list, list, dict[str, int]]:
    """Split rows into records settled now (done before, adopted, invalid) and rows left to generate;
    ``video``: the rows' results are videos."""
    from rayxdit.batch.manifest import load_records, output_path, record, remove_partial_files, sha256_file
    from rayxdit.batch.rows import STATUS_INVALID, STATUS_OK

    remove_partial_files(output)
    previous = load_records(output)
    settled, pending = [], []
    counts = {"done_before": 0, "adopted": 0, "invalid": 0}
    for row in rows:
        earlier = previous.get(row["id"])
        path = output_path(output, row["id"], video)
        if earlier is not None and earlier["status"] == STATUS_INVALID:
            counts["invalid"] += 1  # the model refused it in an earlier run: still invalid, not retried
        elif earlier is not None and earlier["status"] == STATUS_OK and path.exists():
            counts["done_before"] += 1
        elif row["status"] == STATUS_INVALID:
            settled.append(record(row, run_id, status=STATUS_INVALID, error=row["error"]))
            counts["invalid"] += 1
        elif path.exists():  # written before a crash took its manifest part: adopt it, do not redo it
            settled.append(
                record(
                    row,
                    run_id,
                    status=STATUS_OK,
                    path=str(path.relative_to(output)),
                    sha256=sha256_file(path),
                    recovered=True,
                    attempts=1,  # it was made once; its time, GPU-seconds and ranks died with its manifest part
                )
            )
            counts["adopted"] += 1
        else:
            pending.append(row)
    return settled, pending, counts


def group_from_args(args: argparse.Namespace) -> WorkerGroupConfig:
    """The worker groups' config: the engine the flags describe, on the accelerator asked for;
    :class:`ConfigError` naming the flag when it cannot work."""
    from pydantic import ValidationError

    from rayxdit.config import ConfigError, describe_validation_error, engine_config_from_args

    engine = engine_config_from_args(args)
    try:
        return WorkerGroupConfig(
            name="batch",
            engine=engine,
            accelerator=args.accelerator or "gpu",
            cpus_per_rank=args.cpus_per_rank or (CPU_RANK_CPUS if args.accelerator == "cpu" else 1.0),
            request_timeout_s=args.request_timeout_s,
        )
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


def group_and_card(args: argparse.Namespace):
    """The worker groups' config and the model's card (read from its config files); ConfigError when the
    model cannot be split as asked."""
    from rayxdit.runtime.cards import model_card

    group = group_from_args(args)
    card = model_card(group.engine.model)
    card.check_engine(group.engine)
    return group, card


def generate_pending(
    pending: list[dict[str, Any]],
    group: WorkerGroupConfig,
    args,
    output: Path,
    run_id: str,
    fps: int | None = None,
) -> tuple[dict[str, int], bool]:
    """Generate the pending rows on ``args.pools`` worker groups, writing manifest parts as rows finish.
    Returns the rows finished by status and whether Ctrl-C interrupted the run."""
    import pyarrow as pa
    import ray.data
    from tqdm.auto import tqdm

    from rayxdit.batch.generator import GroupGenerator
    from rayxdit.batch.manifest import SCHEMA, write_part

    dataset = ray.data.from_arrow(pa.Table.from_pylist(pending, schema=row_schema())).map_batches(
        GroupGenerator,
        fn_constructor_kwargs={
            "group": group,
            "output": str(output),
            "run_id": run_id,
            "max_attempts": args.max_attempts,
            "fps": fps,
        },
        compute=ray.data.ActorPoolStrategy(size=args.pools),
        batch_size=1,
        batch_format="pyarrow",
        # The actor only drives its worker group, whose ranks hold the resources: asking for CPUs beside
        # the group's placement group could leave the group unplaceable on a small machine.
        num_cpus=0,
    )
    finished_by_status: dict[str, int] = {}
    buffer: list[dict[str, Any]] = []
    unit = "img" if fps is None else "video"
    progress = tqdm(total=len(pending), unit=unit, desc="generate", dynamic_ncols=True)
    watcher = PlacementWatcher(run_id)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for finished in batch.cast(SCHEMA).to_pylist():
                buffer.append(finished)
                finished_by_status[finished["status"]] = finished_by_status.get(finished["status"], 0) + 1
                progress.update(1)
                progress.set_postfix(finished_by_status)
            if len(buffer) >= args.rows_per_part:
                write_part(output, buffer, run_id)
                buffer = []
    except KeyboardInterrupt:
        return finished_by_status, True
    finally:
        watcher.stop()
        write_part(output, buffer, run_id)
        progress.close()
    return finished_by_status, False


class PlacementWatcher:
    """While the run lasts, say every ``period_s`` when one of its worker groups still waits for resources
    (a cluster that is busy, or scaling up): a wait is never silent."""

    def __init__(self, run_id: str, period_s: float = 30.0):
        import threading

        self.run_id = run_id
        self.period_s = period_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="placement-watcher")
        self.thread.start()

    def _watch(self) -> None:
        import ray

        from rayxdit.batch.generator import PLACEMENT_PREFIX

        began = time.monotonic()
        while not self.done.wait(self.period_s):
            try:
                waiting = [
                    entry
                    for entry in ray.util.placement_group_table().values()
                    if entry.get("name", "").startswith(f"{PLACEMENT_PREFIX}{self.run_id}")
                    and entry.get("state") == "PENDING"
                ]
            except Exception:
                continue
            if waiting:
                bundles = list(waiting[0].get("bundles", {}).values())
                print(
                    f"rayxdit batch: {len(waiting)} worker group(s) still waiting for resources after "
                    f"{time.monotonic() - began:.0f} s (each needs {bundles}); free now: "
                    f"{ray.available_resources()}",
                    file=sys.stderr,
                    flush=True,
                )

    def stop(self) -> None:
        self.done.set()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import ray

    from rayxdit.batch.manifest import consolidate, load_records, write_part
    from rayxdit.batch.rows import STATUS_FAILED, STATUS_INVALID, STATUS_OK
    from rayxdit.config import ConfigError
    from rayxdit.runtime.executor import forwarded_env
    from rayxdit.runtime.placement import never_placeable_here
    from rayxdit.runtime.ray_executor import check_placeable
    from rayxdit.runtime.ray_start import init_ray

    try:
        group, card = group_and_card(args)
        started_here = args.address is None and "RAY_ADDRESS" not in os.environ
        problem = never_placeable_here(group) if started_here else None
        if problem:  # before a local Ray instance starts: it would have these cores and nothing more
            raise ConfigError(f"worker group {group.name}: {problem}")
        # A Ray started here inherits this environment (a runtime_env would start every worker through Ray's
        # agent, a slower start: see `rayxdit serve`); a cluster's job gets the variables its ranks need.
        runtime_env = None if started_here else {"env_vars": forwarded_env()}
        # A local start is tried again once where Ray's raylet never registered (`init_ray`).
        init_ray(address=args.address, logging_level="warning", runtime_env=runtime_env)
        if args.accelerator is None and ray.cluster_resources().get("GPU", 0) < group.ranks:
            group = group.updated(accelerator="cpu", cpus_per_rank=args.cpus_per_rank or CPU_RANK_CPUS)
        warning = check_placeable(group, started_here=started_here)
        if warning:
            print(
                f"rayxdit batch: warning: {warning} (unless an autoscaler adds such a node)", file=sys.stderr
            )
    except ConfigError as error:
        print(f"rayxdit batch: error: {error}", file=sys.stderr)
        return 2
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    begin = time.perf_counter()

    rows = read_rows(args.input, card.limits, group.engine.controlnets, group.engine.ip_adapter is not None)
    video = card.limits.makes_video
    settled, pending, counts = plan(rows, output, run_id, video)
    write_part(output, settled, run_id)
    print(
        f"rayxdit batch: {len(rows)} rows; {counts['done_before']} done before, {counts['adopted']} adopted, "
        f"{counts['invalid']} invalid, {len(pending)} to generate on {args.pools} x {group.ranks} "
        f"{group.accelerator.upper()} rank(s) ({group.engine.parallel})",
        flush=True,
    )
    finished, interrupted = ({}, False)
    if pending:
        fps = card.limits.fps if video else None
        finished, interrupted = generate_pending(pending, group, args, output, run_id, fps)
    generated, failed = finished.get(STATUS_OK, 0), finished.get(STATUS_FAILED, 0)
    counts["invalid"] += finished.get(STATUS_INVALID, 0)

    best = load_records(output)
    ordered = [best[row["id"]] for row in rows if row["id"] in best]
    manifest = consolidate(output, ordered)
    elapsed = time.perf_counter() - begin
    missing = len(rows) - len(ordered)
    print(
        f"rayxdit batch: {generated} generated, {failed} failed, {counts['done_before']} done before, "
        f"{counts['adopted']} adopted, {counts['invalid']} invalid; "
        f"{generated / elapsed:.2f} {'videos' if video else 'images'}/s over "
        f"{elapsed:.0f} s; manifest {manifest} ({len(ordered)} rows"
        f"{f', {missing} still to do: rerun to resume' if missing else ''})",
        flush=True,
    )
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
