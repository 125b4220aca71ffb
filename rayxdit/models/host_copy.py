"""A node's host copy of a model's weights: written once, in shared memory, by the first rank on a node that
loads the model from its checkpoint; read by every later rank on that node in large parallel transfers.

Why: a replica started again on a node (a rebuild, an elastic reshape) read its checkpoint through diffusers'
``from_pretrained`` each time, 6.9-7.6 s for Flux.1-dev's 32 GB even from the page cache (H200,
``serve-restart-checkpoint-flux-dev-1xh200.json``): tensor by tensor into pageable memory, then to the GPU.
Here the tensors of every module of the pipeline lie in one file per module in a RAM file system
(``/dev/shm``), and a rank reads them with many threads into pinned buffers and from there into one
allocation per module on its device. The modules are built on the meta device from their saved configs and
given the copy's tensors; the rest of the pipeline (tokenizers, scheduler: small files) comes from the
model's directory as before, through ``from_pretrained`` with the modules passed in.

Plain files, not Ray's object store: a forked rank is not a Ray worker, and ``models/`` never imports Ray.
Files outlive the processes that wrote them (a node keeps its copies across replica restarts and fork
server restarts) and are evicted least recently used first when a new copy would not fit in the memory the
node can spare. A copy is keyed by the model's files (names, sizes, modification times), the checkpoint, the
dtype and the versions of the libraries that build the modules: a changed checkpoint is never served from
a stale copy.

A replica's warm-up needs the weights' shapes, not their values (it compiles; its image is thrown away), so
:func:`read_copy` returns once the modules are built and their buffers allocated, while the threads fill
them: the warm-up runs meanwhile, and everything else waits (:meth:`CopyRead.wait`). A copy's directory must
belong to this user and be writable by no one else (a copy holds pickled configs): another's is ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when the layout of a copy changes: older copies are never read."""
DEFAULT_DIR = "/dev/shm/rayxdit-weights"
DIR_ENV = "RAYXDIT_HOST_COPY_DIR"
"""Where a node keeps its copies (default :data:`DEFAULT_DIR`; a RAM file system, or the copy is a disk read)."""
SPARE_FRACTION = 0.25
"""Of the node's memory, what a new copy must leave available (the ranks' own host memory, the page cache)."""
ALIGN = 4096
"""Every tensor starts at a multiple of this in its file (and so in its device buffer: aligned for any dtype)."""
CHUNK = 16 << 20
"""Bytes per read: large enough for full-speed transfers, small enough that the pinned buffers stay cheap
(16 threads x 2 x 16 MB: ~0.25 s to pin; 64 MB buffers took 0.94 s on the H200 host)."""
MAX_THREADS = 16


def host_copy_dir() -> Path:
    return Path(os.environ.get(DIR_ENV, DEFAULT_DIR))


def _trusted(directory: Path) -> bool:
    """Whether ``directory`` is this user's and writable by no one else (its copies' configs are unpickled)."""
    stat = directory.stat()
    if stat.st_uid == os.getuid() and not stat.st_mode & 0o022:
        return True
    logger.warning("ignoring the host copies in %s: not this user's, or writable by others", directory)
    return False


def copy_key(location: str, checkpoint: str | None, dtype: torch.dtype) -> str:
    """The name of a model's copy: changes with any file of the model's directory (name, size, modification
    time), with the checkpoint, the dtype and the libraries that build its modules."""
    import diffusers
    import transformers

    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [FORMAT, str(dtype), torch.__version__, diffusers.__version__, transformers.__version__]
        ).encode()
    )
    for path in [os.path.realpath(location), *([os.path.realpath(checkpoint)] if checkpoint else [])]:
        digest.update(path.encode())
        for file in sorted(_files(path)):
            stat = os.stat(file)
            digest.update(f"{os.path.relpath(file, path)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _files(path: str) -> Iterator[str]:
    if os.path.isfile(path):
        yield path
        return
    for root, _, names in os.walk(path, followlinks=True):
        for name in names:
            yield os.path.join(root, name)


# ----- writing ------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    names: list[str]
    """Every name the tensor has in its module (a tied weight has several) ..."""
    kinds: list[str]
    """... and whether each is a ``parameter`` or a ``buffer``."""
    offset: int
    nbytes: int
    dtype: str
    shape: list[int]
    requires_grad: bool


def _layout(module: torch.nn.Module) -> tuple[list[_Entry], list[torch.Tensor], int]:
    """Every parameter and buffer of ``module`` (persistent or not), once per tensor, laid out in one file."""
    entries: dict[int, _Entry] = {}
    tensors: dict[int, torch.Tensor] = {}
    offset = 0
    named = [("parameter", item) for item in module.named_parameters(remove_duplicate=False)]
    named += [("buffer", item) for item in module.named_buffers(remove_duplicate=False)]
    for kind, (name, tensor) in named:
        if tensor is None:
            continue
        if id(tensor) in entries:
            entries[id(tensor)].names.append(name)
            entries[id(tensor)].kinds.append(kind)
            continue
        nbytes = tensor.numel() * tensor.element_size()
        entries[id(tensor)] = _Entry(
            [name],
            [kind],
            offset,
            nbytes,
            str(tensor.dtype).removeprefix("torch."),
            list(tensor.shape),
            bool(tensor.requires_grad),
        )
        # Detached: the module's .to(device) swaps its parameters' data, not this tensor's.
        tensors[id(tensor)] = tensor.detach().contiguous()
        offset += -(-nbytes // ALIGN) * ALIGN
    return list(entries.values()), list(tensors.values()), offset


@dataclass
class _ModuleCopy:
    component: str
    module: str
    cls: str
    entries: list[_Entry]
    tensors: list[torch.Tensor]
    size: int
    config: Any
    """The module's config as it was loaded: the copy's module is built from it."""


def snapshot(pipeline: Any) -> list[_ModuleCopy]:
    """What :func:`write_copy` writes, taken from a pipeline still in host memory (call before it moves to the
    device: the tensors are held, not copied)."""
    copies = []
    for component, module in pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            entries, tensors, size = _layout(module)
            if any(t.device.type != "cpu" for t in tensors):
                return []  # built on a device already: nothing in host memory to keep
            cls = type(module)
            copies.append(
                _ModuleCopy(
                    component, cls.__module__, cls.__qualname__, entries, tensors, size, module.config
                )
            )
    return copies


def spare_bytes(directory: Path) -> int:
    """What a new copy may take on this node: the memory available beyond :data:`SPARE_FRACTION` of the
    total, and no more than the file system holding the copies has free."""
    meminfo = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as file:
        for line in file:
            name, _, value = line.partition(":")
            meminfo[name] = int(value.split()[0]) * 1024
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if "MemAvailable" not in meminfo:
        return free
    return min(free, meminfo["MemAvailable"] - int(SPARE_FRACTION * meminfo["MemTotal"]))


def copies_to_evict(copies: list[tuple[str, int, float]], needed: int, spare: int) -> list[str] | None:
    """Which copies (key, bytes, last used) to delete, least recently used first, so that ``needed`` bytes fit
    in ``spare`` plus what they free; None when even all of them would not make room."""
    chosen: list[str] = []
    for key, size, _ in sorted(copies, key=lambda copy: copy[2]):
        if needed <= spare:
            break
        chosen.append(key)
        spare += size
    return chosen if needed <= spare else None


def remove_copies() -> int:
    """Delete every copy this node keeps (as on a node that never served a model); how many there were. A
    rank reading one keeps what it has open."""
    directory = host_copy_dir()
    removed = 0
    for folder in directory.glob("*") if directory.is_dir() else []:
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def existing_copies(directory: Path | None = None) -> list[tuple[str, int, float]]:
    """The whole copies a node keeps: (key, bytes, last used)."""
    directory = directory or host_copy_dir()
    copies = []
    for manifest in directory.glob("*/manifest.json"):
        with contextlib.suppress(OSError):
            size = sum(file.stat().st_size for file in manifest.parent.iterdir())
            copies.append((manifest.parent.name, size, manifest.stat().st_mtime))
    return copies


def _remove_abandoned(directory: Path) -> None:
    """Delete the half-written copies whose writer is gone (nobody holds their lock): a replica killed while
    it wrote one would otherwise leave its memory taken until the same model is copied again."""
    for partial in directory.glob("*.partial"):
        with _writer_lock(directory, partial.name.removesuffix(".partial")) as abandoned:
            if abandoned:
                shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def _writer_lock(directory: Path, key: str) -> Iterator[bool]:
    """Whether this process may write ``key`` (one writer per copy per node: the lock goes with its process)."""
    with open(directory / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def write_copy(key: str, copies: list[_ModuleCopy], description: str) -> bool:
    """Write a model's copy under :func:`host_copy_dir` (whole, or not at all: a half-written copy is never
    read). False when another process writes it, it exists, or the node cannot spare the memory."""
    directory = host_copy_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _trusted(directory):
        return False
    final, partial = directory / key, directory / f"{key}.partial"
    began = time.perf_counter()
    with _writer_lock(directory, key) as mine:
        if not mine or (final / "manifest.json").exists():
            return False
        shutil.rmtree(partial, ignore_errors=True)  # this copy's writer that died before it finished
        _remove_abandoned(directory)  # and other copies' (their locks are free)
        needed, spare = sum(copy.size for copy in copies), spare_bytes(directory)
        evict = copies_to_evict(existing_copies(directory), needed, spare)
        if evict is None:
            logger.warning(
                "no host copy of %s: it needs %.1f GiB, this node can spare %.1f GiB",
                description,
                needed / 2**30,
                spare / 2**30,
            )
            return False
        for old in evict:
            logger.info("evicting the host copy %s (least recently used) for %s", old, description)
            shutil.rmtree(directory / old, ignore_errors=True)
        partial.mkdir(mode=0o700)
        for copy in copies:
            _write_tensors(partial / f"{copy.component}.bin", copy)
        manifest = {
            "format": FORMAT,
            "model": description,
            "modules": [
                {
                    "component": copy.component,
                    "module": copy.module,
                    "cls": copy.cls,
                    "size": copy.size,
                    "entries": [entry.__dict__ for entry in copy.entries],
                }
                for copy in copies
            ],
        }
        (partial / "configs.pickle").write_bytes(
            pickle.dumps({copy.component: copy.config for copy in copies})
        )
        (partial / "manifest.json").write_text(json.dumps(manifest))
        os.rename(partial, final)
    seconds = time.perf_counter() - began
    logger.info("wrote the host copy of %s: %.1f GiB in %.1f s", description, needed / 2**30, seconds)
    return True


def keep_copy(key: str, copies: list[_ModuleCopy], description: str, background: bool) -> None:
    """:func:`write_copy`, on a daemon thread when ``background`` (the start that read the checkpoint does not
    wait; its host tensors are held until written). A failure (a full disk, a removed directory) is logged:
    the next start reads the checkpoint, as without a copy."""

    def write() -> None:
        try:
            write_copy(key, copies, description)
        except Exception:
            logger.exception("could not write the host copy of %s", description)
        finally:
            copies.clear()

    if not background:
        write()
        return
    thread = threading.Thread(target=write, name=f"host-copy-{key[:8]}", daemon=True)
    _WRITERS.append(thread)
    thread.start()


_WRITERS: list[threading.Thread] = []


def wait_for_writes() -> None:
    """Wait until this process's copies in the background are written (or failed)."""
    while _WRITERS:
        _WRITERS.pop().join()


def _threads() -> int:
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def _in_parallel(work: Callable[[list[Any]], None], items: list[Any], threads: int) -> Callable[[], None]:
    """Start ``work`` on ``threads`` threads, each given every ``threads``-th item; returns what joins them
    (and raises the first error)."""
    errors: list[BaseException] = []

    def run(mine: list[Any]) -> None:
        try:
            work(mine)
        except BaseException as error:  # re-raised by the join
            errors.append(error)

    workers = [
        threading.Thread(target=run, args=(items[k::threads],)) for k in range(min(threads, len(items)))
    ]
    for worker in workers:
        worker.start()

    def join() -> None:
        for worker in workers:
            worker.join()
        if errors:
            raise errors[0]

    return join


def _spans(sizes: list[int]) -> list[tuple[int, int, int]]:
    """``(index, start, length)``: pieces of at most :data:`CHUNK` bytes of each of ``sizes``, in order."""
    return [
        (index, start, min(CHUNK, size - start))
        for index, size in enumerate(sizes)
        for start in range(0, size, CHUNK)
    ]


def _write_tensors(path: Path, copy: _ModuleCopy) -> None:
    """The module's tensors at their offsets in one file, in pieces written by :func:`_threads` threads."""
    views = [memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) for tensor in copy.tensors]
    with open(path, "wb") as file:
        os.ftruncate(file.fileno(), copy.size)

        def write(mine: list[tuple[int, int, int]]) -> None:
            for index, start, length in mine:
                os.pwrite(
                    file.fileno(), views[index][start : start + length], copy.entries[index].offset + start
                )

        _in_parallel(write, _spans([entry.nbytes for entry in copy.entries]), _threads())()


# ----- reading ------------------------------------------------------------------------------------------------
@dataclass
class CopyRead:
    """A copy's modules on the device, their tensors still arriving until :meth:`wait` returns."""

    modules: dict[str, torch.nn.Module]
    finish: Callable[[], None]
    began: float
    description: str
    size: int
    seconds: float | None = None

    def wait(self) -> float:
        """Wait until every tensor is in place (a read that failed raises here); the read's seconds."""
        if self.seconds is None:
            self.finish()
            self.seconds = round(time.perf_counter() - self.began, 3)
            logger.info(
                "read %s from the node's host copy: %.1f GiB in %.2f s (%.1f GB/s)",
                self.description,
                self.size / 2**30,
                self.seconds,
                self.size / max(self.seconds, 1e-9) / 1e9,
            )
        return self.seconds


def read_copy(key: str, device: torch.device) -> CopyRead | None:
    """Start reading copy ``key`` onto ``device``: its modules, built and given their (still empty) tensors,
    while threads fill them; :meth:`CopyRead.wait` before their values are used. None when this node has no
    such copy, or a module no longer builds the way it was saved (then the caller loads the checkpoint)."""
    folder = host_copy_dir() / key
    try:
        if not _trusted(folder.parent):
            return None
        manifest = json.loads((folder / "manifest.json").read_text())
        configs = pickle.loads((folder / "configs.pickle").read_bytes())
    except (OSError, ValueError, pickle.UnpicklingError):
        return None
    if manifest.get("format") != FORMAT:
        return None
    with contextlib.suppress(OSError):
        os.utime(folder / "manifest.json")  # used now: the last to be evicted
    began = time.perf_counter()
    specs = manifest["modules"]
    buffers = [torch.empty(spec["size"], dtype=torch.uint8, device=device) for spec in specs]
    modules = {}
    for spec, buffer in zip(specs, buffers, strict=True):
        module = _skeleton(spec, configs[spec["component"]])
        if not _fill(module, spec["entries"], buffer):
            logger.warning(
                "the host copy %s does not fit %s any more: reading the checkpoint", key, spec["cls"]
            )
            return None
        modules[spec["component"]] = module.eval()
    # A module with integer tensors (CLIP's position ids) is read before this returns: a warm-up that ran on
    # half-read indices could index out of range, which on a GPU ends its CUDA context. Floating-point weights
    # may arrive later: a warm-up on them computes numbers that are thrown away.
    now = [
        i for i, spec in enumerate(specs) if not all(_floating(entry["dtype"]) for entry in spec["entries"])
    ]
    later = [i for i in range(len(specs)) if i not in now]
    for part in (now, later):
        files = [folder / f"{specs[i]['component']}.bin" for i in part]
        finish = _start_reading(files, [buffers[i] for i in part], device)
        if part is now:
            finish()
    size = sum(spec["size"] for spec in specs)
    return CopyRead(modules, finish, began, manifest["model"], size)


def _floating(dtype: str) -> bool:
    return getattr(torch, dtype).is_floating_point


def _skeleton(spec: dict[str, Any], config: Any) -> torch.nn.Module:
    """The module's class built from its config on the meta device: no memory, no initialization."""
    cls = getattr(importlib.import_module(spec["module"]), spec["cls"])
    with torch.device("meta"):
        if hasattr(cls, "_from_config"):  # transformers
            return cls._from_config(config)
        return cls.from_config(config)


def _start_reading(
    files: list[Path], buffers: list[torch.Tensor], device: torch.device
) -> Callable[[], None]:
    """Fill each buffer with its file's bytes on :func:`_threads` threads; returns what waits for them. On a GPU,
    each thread reads chunks into pinned buffers and copies each to the GPU on its own stream, two buffers
    each so that a read overlaps the previous chunk's copy (a pageable copy of a tmpfs file ran at ~6 GB/s on
    the H200 host, ~17 GB/s this way)."""
    fds = [os.open(path, os.O_RDONLY) for path in files]

    def read_host(mine: list[tuple[int, int, int]]) -> None:  # straight into the weights' own memory
        targets = [memoryview(buffer.numpy()) for buffer in buffers]
        for index, start, length in mine:
            _read_exactly(fds[index], targets[index][start : start + length], start)

    def read_to_device(mine: list[tuple[int, int, int]]) -> None:
        stream = torch.cuda.Stream(device)
        staging = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        done: list[torch.cuda.Event | None] = [None, None]
        for count, (index, start, length) in enumerate(mine):
            slot = count % 2
            if done[slot] is not None:
                done[slot].synchronize()  # its previous copy has left the pinned buffer
            _read_exactly(fds[index], memoryview(staging[slot].numpy())[:length], start)
            with torch.cuda.stream(stream):
                buffers[index][start : start + length].copy_(staging[slot][:length], non_blocking=True)
                done[slot] = torch.cuda.Event()
                done[slot].record(stream)
        stream.synchronize()  # in place for every stream from here on

    spans = _spans([buffer.numel() for buffer in buffers])
    finish = _in_parallel(read_to_device if device.type == "cuda" else read_host, spans, _threads())

    def wait() -> None:
        try:
            finish()
        finally:
            for fd in fds:
                os.close(fd)
        empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None)
        if device.type == "cuda" and empty_host_cache is not None:  # pinned buffers back (torch >= 2.12)
            empty_host_cache()

    return wait


def own_storage(module: torch.nn.Module) -> None:
    """Give every plain tensor of ``module`` memory of its own. A module read from a host copy views one
    buffer per module; once quantization has replaced most of its weights, the few left (norms, biases,
    embedders) would keep the whole unquantized buffer alive: copied out, they let it go."""
    with torch.no_grad():
        for parameter in module.parameters():
            if type(parameter.data) is torch.Tensor:
                parameter.data = parameter.data.clone()
        for owner in module.modules():
            for name, tensor in owner._buffers.items():
                if type(tensor) is torch.Tensor:
                    owner._buffers[name] = tensor.clone()


def _read_exactly(fd: int, target: memoryview, offset: int) -> None:
    while len(target):
        got = os.preadv(fd, [target], offset)
        if got <= 0:
            raise OSError(f"host copy truncated at byte {offset}")
        target, offset = target[got:], offset + got


def _fill(module: torch.nn.Module, entries: list[dict[str, Any]], buffer: torch.Tensor) -> bool:
    """Give every parameter and buffer of the skeleton its tensor, a view of ``buffer`` (tied weights share
    one); False when the names differ from the saved ones."""
    expected = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    expected |= {name for name, tensor in module.named_buffers(remove_duplicate=False) if tensor is not None}
    if expected != {name for entry in entries for name in entry["names"]}:
        return False
    for entry in entries:
        dtype = getattr(torch, entry["dtype"])
        view = buffer[entry["offset"] : entry["offset"] + entry["nbytes"]].view(dtype).view(entry["shape"])
        parameter = torch.nn.Parameter(view, requires_grad=entry["requires_grad"])
        for name, kind in zip(entry["names"], entry["kinds"], strict=True):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if kind == "parameter":
                owner._parameters[leaf] = parameter
            else:
                owner._buffers[leaf] = view
    return True
