"""A node's host copy of a model's weights (rayxdit.models.host_copy): a model started from it is the model
read from its checkpoint, tensor for tensor and image for image; a changed checkpoint is never served from
an old copy; one writer per copy; a node without memory to spare writes none and serves from the checkpoint."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
from pathlib import Path

import numpy
import pytest
import torch

import rayxdit.models.host_copy as host_copy
from rayxdit.config import EngineConfig
from rayxdit.engine import Engine
from rayxdit.models.host_copy import (
    DIR_ENV,
    copies_to_evict,
    copy_key,
    existing_copies,
    keep_copy,
    own_storage,
    read_copy,
    snapshot,
    wait_for_writes,
    write_copy,
)
from rayxdit.models.presets import materialize_preset
from rayxdit.models.registry import load_adapter
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest
from tests.lora_files import lora_source

REQUEST = GenerateRequest(prompt="a lighthouse at dusk", width=64, height=64, steps=2, seed=7)


@pytest.fixture
def copies(tmp_path, monkeypatch) -> Path:
    """This test's own host-copy directory."""
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "copies"))
    return tmp_path / "copies"


def start(model: str, **options) -> Engine:
    """An engine with its weights in place (read from a host copy, they may arrive after it is built)."""
    engine = Engine(EngineConfig(model=model, **options), ParallelState.single())
    engine.weights_ready()
    wait_for_writes()
    return engine


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False))
    return named | {name: t for name, t in module.named_buffers(remove_duplicate=False) if t is not None}


def assert_same_modules(read: Engine, loaded: Engine) -> None:
    """Every module of the pipeline: its class, config, mode, and every parameter and buffer (persistent or
    not) with its dtype, shape, values, and ties."""
    for name, module in loaded.adapter.pipeline.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        other = read.adapter.pipeline.components[name]
        assert type(other) is type(module) and other.training == module.training, name
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        assert (other.config.to_dict() if hasattr(other.config, "to_dict") else dict(other.config)) == config
        mine, theirs = tensors(module), tensors(other)
        assert mine.keys() == theirs.keys(), (name, mine.keys() ^ theirs.keys())
        for key, tensor in mine.items():
            assert theirs[key].dtype == tensor.dtype and torch.equal(theirs[key], tensor), f"{name}.{key}"
        # Tied weights (T5's shared embedding) stay one tensor.
        ties = {
            key for key in mine for other_key in mine if key != other_key and mine[key] is mine[other_key]
        }
        assert all(
            theirs[key] is theirs[other] for key in ties for other in ties if mine[key] is mine[other]
        ), name


def in_own_memory(engine: Engine) -> Engine:
    """The engine with every tensor in memory of its own, as ``.to(device)`` leaves a GPU's. On a CPU,
    ``from_pretrained`` leaves them viewing the checkpoint's memory map at unaligned addresses, and CPU
    kernels round differently with alignment (the same tiny-sdxl weights moved to fresh memory: 1.2e-5 apart)."""
    for module in engine.adapter.pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            own_storage(module)
    return engine


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sdxl"])
def test_a_model_started_from_the_host_copy_is_the_model_read_from_its_checkpoint(model, copies):
    loaded = start(model)
    assert "host_copy" not in loaded.load_seconds and len(existing_copies()) == 1
    read = start(model)
    assert read.load_seconds["host_copy"] > 0
    assert_same_modules(read, loaded)
    in_own_memory(loaded)
    assert torch.equal(
        read.generate(REQUEST, output="latent").latents, loaded.generate(REQUEST, output="latent").latents
    )


def test_a_copy_that_differs_from_the_checkpoint_fails_the_comparison(copies):
    """The comparison above can fail: one weight of the copy changed, both the tensors and the image differ."""
    loaded = in_own_memory(start("tiny-flux"))
    ((key, _, _),) = existing_copies()
    with open(copies / key / "transformer.bin", "r+b") as file:  # the first weight's first bytes
        file.write(b"\x7f" * 64)
    read = start("tiny-flux")
    assert read.load_seconds["host_copy"] > 0
    with pytest.raises(AssertionError):
        assert_same_modules(read, loaded)
    assert not torch.equal(
        read.generate(REQUEST, output="latent").latents, loaded.generate(REQUEST, output="latent").latents
    )


def test_a_changed_checkpoint_is_read_again_never_from_the_old_copy(copies, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(materialize_preset("tiny-flux"), model)
    start(model)
    first = copy_key(model, None, torch.float32)
    weights = next(Path(model, "transformer").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new version
    assert copy_key(model, None, torch.float32) != first
    engine = start(model)
    assert "host_copy" not in engine.load_seconds  # read from the checkpoint, and copied again
    assert {key for key, _, _ in existing_copies()} == {first, copy_key(model, None, torch.float32)}


def test_without_host_copy_nothing_is_written_or_read(copies):
    start("tiny-flux", host_copy=False)
    assert existing_copies() == []


def test_one_writer_per_copy(copies):
    pipeline = load_adapter("tiny-flux", torch.device("cpu"), torch.float32).pipeline
    copies.mkdir(parents=True)
    with open(copies / "k.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process writing it
        assert not write_copy("k", snapshot(pipeline), "tiny-flux")
    assert write_copy("k", snapshot(pipeline), "tiny-flux")
    assert not write_copy("k", snapshot(pipeline), "tiny-flux")  # there already
    assert [key for key, _, _ in existing_copies()] == ["k"]


def test_a_node_without_memory_to_spare_serves_from_the_checkpoint(copies, monkeypatch):
    monkeypatch.setattr(host_copy, "SPARE_FRACTION", 1.0)  # a copy would have to leave all memory free
    engine = start("tiny-flux")
    assert existing_copies() == [] and "host_copy" not in engine.load_seconds
    assert engine.generate(REQUEST, output="latent").latents.isfinite().all()


def test_copies_are_evicted_least_recently_used_first_and_only_as_needed():
    copies = [("old", 30, 1.0), ("new", 30, 3.0), ("middle", 30, 2.0)]
    assert copies_to_evict(copies, needed=20, spare=25) == []
    assert copies_to_evict(copies, needed=50, spare=25) == ["old"]
    assert copies_to_evict(copies, needed=80, spare=25) == ["old", "middle"]
    assert copies_to_evict(copies, needed=200, spare=25) is None


def test_own_storage_lets_the_copy_buffer_go(copies):
    start("tiny-flux")
    read = start("tiny-flux")
    transformer = read.adapter.transformer
    buffer = next(transformer.parameters()).untyped_storage().data_ptr()
    shared = lambda: [p for p in transformer.parameters() if p.untyped_storage().data_ptr() == buffer]  # noqa: E731
    assert len(shared()) == len(list(transformer.parameters()))  # one buffer per module
    before = read.generate(REQUEST, output="latent").latents
    own_storage(transformer)
    assert shared() == []
    assert torch.equal(read.generate(REQUEST, output="latent").latents, before)


def hub_snapshot(cache: Path, repo: str, revision: str, files: Path) -> Path:
    """A model in huggingface_hub's cache layout, as a download leaves it (``refs/main`` names the snapshot)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, folder / "snapshots" / revision)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return folder / "snapshots" / revision


def test_a_hub_model_is_copied_by_its_revision(copies, tmp_path, monkeypatch):
    """A hub id is keyed by the snapshot its files are in: a new revision is read, and copied, again."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    hub_snapshot(cache, "acme/tiny-flux", "a" * 40, materialize_preset("tiny-flux"))
    loaded = start("acme/tiny-flux")
    assert "host_copy" not in loaded.load_seconds and len(existing_copies()) == 1
    assert start("acme/tiny-flux").load_seconds["host_copy"] > 0
    hub_snapshot(cache, "acme/tiny-flux", "b" * 40, materialize_preset("tiny-flux"))  # a new revision
    assert "host_copy" not in start("acme/tiny-flux").load_seconds
    assert len(existing_copies()) == 2


def test_a_lora_fused_at_load_stays_out_of_the_copy(copies):
    """On a CPU the pipeline keeps the very tensors the copy is written from: written before the LoRA is fused
    into them, the copy is the plain model's."""
    fused = start("tiny-flux", loras=(f"{lora_source()}/tiny-flux/ink.safetensors:0.8",))
    assert len(existing_copies()) == 1
    read, plain = start("tiny-flux"), in_own_memory(start("tiny-flux", host_copy=False))
    assert read.load_seconds["host_copy"] > 0
    assert_same_modules(read, plain)
    latents = read.generate(REQUEST, output="latent").latents
    assert torch.equal(latents, plain.generate(REQUEST, output="latent").latents)
    assert not torch.equal(latents, fused.generate(REQUEST, output="latent").latents)


def test_a_copy_written_in_the_background_reads_back_whole(copies):
    """A GPU start's path: the copy written on a thread while the start goes on, then read by the next."""
    pipeline = load_adapter("tiny-flux", torch.device("cpu"), torch.float32).pipeline
    keep_copy("k", snapshot(pipeline), "tiny-flux", background=True)
    wait_for_writes()
    read = read_copy("k", torch.device("cpu"))
    assert read is not None and read.wait() > 0
    modules = read.modules
    components = {name: m for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}
    assert modules.keys() == components.keys()
    for name, module in components.items():
        mine, theirs = tensors(module), tensors(modules[name])
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name


def test_a_warm_up_runs_while_the_weights_arrive_and_the_first_request_waits_for_them(copies, monkeypatch):
    """A replica's warm-up (its output thrown away) runs while the copy's read goes on; a request waits for
    the read, so it gets the model's own image. The transformer's read is held here until after the next
    request has started: the warm-up's output shows its weights were not in place, and the request's that it
    waited. The bytes not yet read are set to garbage first: a fresh allocation may hold whatever was freed
    there, and once held the same weights, freed a moment before (the warm-up then matched the reference:
    seen once in a full run). Sabotage check: without the wait in ``Engine.generate``, the request's image is
    the garbage's."""
    reference = in_own_memory(start("tiny-flux")).generate(REQUEST, output="latent").latents
    read_exactly, released = host_copy._read_exactly, threading.Event()

    def held(fd: int, target: memoryview, offset: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("transformer.bin"):
            numpy.frombuffer(target, dtype=numpy.uint8)[:] = 0xFF  # NaN in every float, until read
            assert released.wait(60)
        read_exactly(fd, target, offset)

    monkeypatch.setattr(host_copy, "_read_exactly", held)
    engine = Engine(EngineConfig(model="tiny-flux"), ParallelState.single())
    assert engine.adapter.weights_arriving.seconds is None  # still reading
    early = engine.generate(REQUEST, output="latent", warm_up=True).latents
    assert not torch.equal(early, reference)
    answered: dict[str, torch.Tensor] = {}
    request = threading.Thread(
        target=lambda: answered.update(latents=engine.generate(REQUEST, output="latent").latents)
    )
    request.start()
    time.sleep(0.5)  # the request is under way (or, not waiting, done) before the read may go on
    released.set()
    request.join(60)
    assert torch.equal(answered["latents"], reference)
    assert engine.load_seconds["host_copy"] > 0


def test_copies_in_a_directory_others_can_write_are_ignored(copies):
    """A copy's configs are unpickled: a directory anyone could have written is neither read nor written."""
    start("tiny-flux")
    assert len(existing_copies()) == 1
    copies.chmod(0o777)
    assert "host_copy" not in start("tiny-flux").load_seconds  # read from the checkpoint
    ((key, _, _),) = existing_copies()
    shutil.rmtree(copies / key)
    start("tiny-flux")
    assert existing_copies() == []  # and not written there either


def test_a_half_written_copy_whose_writer_died_is_removed_by_the_next_writer(copies):
    pipeline = load_adapter("tiny-flux", torch.device("cpu"), torch.float32).pipeline
    copies.mkdir(parents=True)
    for name in ("dead", "writing"):
        (copies / f"{name}.partial").mkdir()
        (copies / f"{name}.partial" / "transformer.bin").write_bytes(b"\0" * 4096)
    with open(copies / "writing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # its writer is still at it
        assert write_copy("k", snapshot(pipeline), "tiny-flux")
    assert not (copies / "dead.partial").exists() and (copies / "writing.partial").exists()
