"""Compile artifacts carried from one process's compile caches into another's (a node that never compiled
this engine): the second compile finds every graph in its cache and compiles none itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

# One rank's part, as a replica on a fresh node runs it: a cache directory of its own, the blob of another
# rank (argv[3] == "load") or none (argv[3] == "save": compile, then write this rank's blob), a compile.
RANK = """
import json, os, sys
os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[1]
import torch
from torch._dynamo.utils import counters
# Scalar C++ kernels: probing the CPU's vector instruction sets compiles test programs (~4 s a process).
torch._inductor.config.cpp.vec_isa_ok = False
from rayxdit.runtime.worker import RankWorker

worker = RankWorker(0, 1, 0)
if sys.argv[3] == "load":
    with open(sys.argv[2], "rb") as blob:
        loaded = worker.load_compile_artifacts({worker._artifact_fingerprint(): blob.read()})
    assert loaded
block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
torch.manual_seed(0)
compiled = torch.compile(block)
with torch.no_grad():
    compiled(torch.randn(4, 16))
if sys.argv[3] == "save":
    fingerprint, blob = worker.compile_artifacts()
    with open(sys.argv[2], "wb") as out:
        out.write(blob)
print(json.dumps({k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}))
"""


def run_rank(cache_dir, blob, mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RANK, str(cache_dir), str(blob), mode],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="inductor on CPU needs a C++ compiler"
)
def test_a_fresh_cache_given_another_ranks_artifacts_compiles_nothing(tmp_path):
    blob = tmp_path / "artifacts.bin"
    made = run_rank(tmp_path / "node-a", blob, "save")
    assert made.get("fxgraph_cache_miss", 0) >= 1 and blob.stat().st_size > 0  # compiled from scratch
    reused = run_rank(tmp_path / "node-b", blob, "load")  # another node: an empty cache of its own
    assert reused.get("fxgraph_cache_hit", 0) >= 1 and reused.get("fxgraph_cache_miss", 0) == 0, reused
