"""benchmarks/export_recipe.py on CPU: a recipe's export is a checkpoint of the very weights the recipe draws,
so its card and its latents equal the recipe's, bit for bit; an occupied directory or a name that is no recipe
is refused in one line before anything is drawn."""

from __future__ import annotations

from dataclasses import replace

from benchmarks import export_recipe

RECIPE = "rayxdit.models.presets:TINY_FLUX"


def latents(model: str):
    """The request's final latents from ``model`` on one rank, every weight in memory of its own: as
    ``.to(device)`` leaves a GPU's (a checkpoint read on a CPU stays a view of its unaligned memory map, where
    CPU kernels round differently: tests/models/test_host_copy.py)."""
    import torch

    from rayxdit.config import EngineConfig
    from rayxdit.engine import Engine
    from rayxdit.models.host_copy import own_storage
    from rayxdit.parallel.mesh import ParallelState
    from rayxdit.request import GenerateRequest

    engine = Engine(EngineConfig(model=model, host_copy=False), ParallelState.single())
    for name, module in engine.adapter.pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            # Inference mode, as from_pretrained leaves a module (a recipe's T5 once kept its dropout on).
            assert not any(part.training for part in module.modules()), f"{model}: {name} is training"
            own_storage(module)
    request = GenerateRequest(prompt="a red fox in the snow", height=32, width=32, steps=2, seed=3)
    return engine.generate(request, output="latent").latents


def test_export_serves_the_recipes_very_image_from_a_checkpoint(tmp_path, capsys):
    from rayxdit.models.catalog import describe_model

    out = tmp_path / "tiny-flux-export"
    assert export_recipe.main([RECIPE, str(out), "--device", "cpu"]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    assert (out / "model_index.json").is_file() and (out / "rayxdit.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == [out.name], "the staging directory was left behind"
    assert replace(describe_model(str(out)), location=RECIPE) == describe_model(RECIPE)

    from_recipe, from_checkpoint = latents(RECIPE), latents(str(out))
    assert from_recipe.std() > 0
    assert from_recipe.equal(from_checkpoint)


def test_an_occupied_directory_or_a_non_recipe_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("mine")
    for model, out, message in (
        (RECIPE, tmp_path / "occupied", "exists and is not an empty directory"),
        ("tiny-flux", tmp_path / "new", "is not a recipe built in code"),
    ):
        assert export_recipe.main([model, str(out), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "occupied" / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()
