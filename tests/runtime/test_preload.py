"""What a node's fork server imports before it forks ranks (rayxdit.runtime.rank_process.preload)."""

from rayxdit.runtime import rank_process
from tests.helpers import fresh_python


def test_the_compiler_is_preloaded_on_gpu_nodes_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("RAYXDIT_PRELOAD_COMPILER", raising=False)
    assert rank_process.preloaded_modules() == rank_process.PRELOADED  # this machine has no GPU
    monkeypatch.setenv("RAYXDIT_PRELOAD_COMPILER", "1")
    assert rank_process.preloaded_modules() == rank_process.PRELOADED + rank_process.COMPILER_MODULES
    monkeypatch.setenv("RAYXDIT_PRELOAD_COMPILER", "0")
    assert rank_process.preloaded_modules() == rank_process.PRELOADED


def test_a_preloaded_server_holds_the_compiler_and_its_cache_key_and_never_touched_cuda():
    """What the server imported and computed is what its forks inherit: the compiler's modules (those this
    installation has) and inductor's key of torch (cached in the process), with CUDA left alone so a fork can
    initialize it."""
    probe = (
        "import sys, importlib.util\n"
        "from rayxdit.runtime import rank_process\n"
        "rank_process.preload(compiler=True)\n"
        "import torch\n"
        "from torch._inductor.codecache import torch_key\n"
        "wanted = [m for m in rank_process.COMPILER_MODULES if importlib.util.find_spec(m.split('.')[0])]\n"
        "missing = [m for m in wanted if m not in sys.modules]\n"
        "cached = torch_key.__closure__ and any(\n"
        "    isinstance(cell.cell_contents, bytes) for cell in torch_key.__closure__)\n"
        "print(missing, bool(cached), torch.cuda.is_initialized())\n"
    )
    printed = fresh_python(probe, env={"PYTORCH_NVML_BASED_CUDA_CHECK": "1", "PATH": "/usr/bin:/bin"})
    assert printed.strip().splitlines()[-1] == "[] True False", printed
