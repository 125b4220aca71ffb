"""LoRA adapters for the tiny test models, written once per machine into a directory every test process
(and every rank process) finds by the same path: the test suite's ``lora_sources``.

Random non-zero weights in diffusers' LoRA format, saved with ``save_lora_weights``; some with an alpha other
than their rank (in the file's adapter metadata, as diffusers writes it), of other ranks, on linear layers and
(SDXL) 1x1 and 3x3 convolutions. Named as requests name them: ``<model>/ink``, ``<model>/styles/sketch``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

ADAPTERS = {
    # model: {name: (rank, alpha, layer name suffixes)}
    "tiny-flux": {
        "ink": (
            4,
            8,
            ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "proj_mlp"),
        ),
        "styles/sketch": (2, 2, ("ff.net.2", "ff_context.net.0.proj", "proj_out", "attn.to_q")),
        "glow": (8, 4, ("norm1.linear", "attn.to_k", "x_embedder", "ff.net.0.proj")),
    },
    "tiny-sdxl": {
        "ink": (4, 8, ("attn1.to_q", "attn2.to_k", "attn1.to_out.0", "conv1", "proj_in")),
        "styles/sketch": (2, 2, ("ff.net.2", "conv2", "conv_shortcut", "attn2.to_v")),
    },
    "tiny-wan": {
        "ink": (4, 8, ("attn1.to_q", "attn1.to_v", "attn2.to_k", "ffn.net.0.proj")),
        "styles/sketch": (2, 2, ("ffn.net.2", "attn1.to_out.0")),
    },
}


def _write(root: Path) -> None:
    from rayxdit.models.registry import load_adapter

    for model, adapters in ADAPTERS.items():
        adapter = load_adapter(model, torch.device("cpu"), torch.float32)
        component = adapter.family.denoiser_subfolder
        modules = dict(getattr(adapter.pipeline, component).named_modules())
        generator = torch.Generator().manual_seed(len(model))
        for name, (rank, alpha, suffixes) in adapters.items():
            layers = {}
            for module_name, module in modules.items():
                if not module_name.endswith(suffixes) or not isinstance(
                    module, (torch.nn.Linear, torch.nn.Conv2d)
                ):
                    continue
                weight = module.weight
                kernel = tuple(weight.shape[2:])
                down = torch.randn((rank, weight.shape[1], *kernel), generator=generator) * 0.15
                up = (
                    torch.randn((weight.shape[0], rank, *((1, 1) if kernel else ())), generator=generator)
                    * 0.15
                )
                layers[f"{module_name}.lora_A.weight"] = down
                layers[f"{module_name}.lora_B.weight"] = up
            assert layers, (model, name)
            folder = root / model / Path(name).parent
            folder.mkdir(parents=True, exist_ok=True)
            metadata = {
                "r": rank,
                "lora_alpha": alpha,
                "target_modules": sorted({k.split(".lora_")[0] for k in layers}),
            }
            type(adapter.pipeline).save_lora_weights(
                folder,
                weight_name=f"{Path(name).name}.safetensors",
                **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": metadata},
            )


def lora_source_path() -> str:
    """Where :func:`lora_source` writes the adapters (named by this file's contents and the presets' version,
    whose shapes they fit), without writing them."""
    from rayxdit.models.presets import PRESET_VERSION

    version = hashlib.sha256(Path(__file__).read_bytes() + f"{PRESET_VERSION}".encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / f"rayxdit-test-loras-{version}")


def lora_source() -> str:
    """The directory holding the test adapters (written on first use, atomically, so concurrent test and rank
    processes agree)."""
    root = Path(lora_source_path())
    if not root.is_dir():
        staging = Path(tempfile.mkdtemp(prefix="rayxdit-test-loras-"))
        _write(staging)
        try:
            os.rename(staging, root)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return str(root)
