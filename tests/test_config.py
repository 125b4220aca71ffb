"""Engine options are declared once (``EngineConfig``) and reach the engine unchanged from every entry point:
``rayxdit generate``, a Serve pool (flat, as pools have always been written, or nested under ``engine:``)
and the batch job. A field that one of them cannot carry fails here."""

from __future__ import annotations

import argparse
import typing
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml

from rayxdit.batch.job import build_parser as batch_parser
from rayxdit.batch.job import group_from_args
from rayxdit.cli import build_parser as cli_parser
from rayxdit.config import (
    ConfigError,
    EngineConfig,
    ParallelConfig,
    PoolConfig,
    engine_config_from_args,
)
from rayxdit.serve.app import load_serve_file


def sample_value(name: str, info: Any) -> Any:
    """A value of the field other than its default (what a user would set it to)."""
    annotation = info.annotation
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    options = [arg for arg in (annotation, *get_args(annotation)) if get_origin(arg) is Literal]
    if annotation is bool:
        return not default
    if options:
        return next(choice for choice in get_args(options[0]) if choice != default)
    if annotation is int:
        return default + 2
    if annotation in (float, float | None):
        return 0.25
    if annotation is ParallelConfig:
        return ParallelConfig(cfg=2, ulysses=2)
    if get_origin(annotation) in (tuple, list):
        return ("one", "two:0.5")
    if annotation in (str, str | None, typing.Optional[str]):  # noqa: UP045 - either spelling
        return {"model": "tiny-sdxl", "checkpoint": "fine-tune.safetensors"}.get(name, "some/location")
    raise AssertionError(f"no sample for {name}: {annotation}")


def as_flags(name: str, info: Any, value: Any) -> list[str]:
    flag = (info.json_schema_extra or {}).get("flag")
    assert flag, f"EngineConfig.{name} names no flag"
    if isinstance(value, bool):
        return [flag]
    if isinstance(value, tuple):
        return [part for item in value for part in (flag, item)]
    return [flag, str(value)]


def through_cli(config: type, name: str, info: Any, value: Any) -> Any:
    args = cli_parser().parse_args(["generate", "--prompt", "x", *as_flags(name, info, value)])
    return getattr(engine_config_from_args(args, config), name)


def through_batch(config: type, name: str, info: Any, value: Any) -> Any:
    args = batch_parser().parse_args(["--input", "in.jsonl", "--output", "out", *as_flags(name, info, value)])
    if config is EngineConfig:
        return getattr(group_from_args(args).engine, name)
    return getattr(engine_config_from_args(args, config), name)


def through_pool_yaml(config: type, name: str, info: Any, value: Any, tmp_path, nested: bool) -> Any:
    written = (
        str(value)
        if isinstance(value, ParallelConfig)
        else list(value)
        if isinstance(value, tuple)
        else value
    )
    pool = {"name": "p", "model": "tiny-flux", **({"engine": {name: written}} if nested else {name: written})}
    if name == "model" and nested:
        pool.pop("model")
    document = {"applications": [{"name": "rayxdit", "import_path": "rayxdit.serve.app:app_builder"}]}
    document["applications"][0]["args"] = {"pools": [pool], "elastic": None}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(document))
    (loaded,) = load_serve_file(path)[0].pools
    return getattr(loaded.engine, name)


def unreachable_fields(config: type, tmp_path) -> list[str]:
    """Each field of ``config`` that some entry point cannot set to a non-default value, with where."""
    missing = []
    for name, info in config.model_fields.items():
        value = sample_value(name, info)
        routes = [
            ("rayxdit generate", through_cli, {}),
            ("python -m rayxdit.batch", through_batch, {}),
            ("a pool (flat)", through_pool_yaml, {"tmp_path": tmp_path, "nested": False}),
            ("a pool (engine:)", through_pool_yaml, {"tmp_path": tmp_path, "nested": True}),
        ]
        for where, carry, options in routes:
            try:
                carried = carry(config, name, info, value, **options)
            except (SystemExit, ValueError, AssertionError) as error:  # argparse exits; pydantic raises
                missing.append(f"{name} from {where}: {type(error).__name__} {error}")
                continue
            if carried != value:
                missing.append(f"{name} from {where}: arrived as {carried!r}, sent {value!r}")
    return missing


def test_every_engine_option_reaches_the_engine_from_every_entry_point(tmp_path, capsys):
    assert unreachable_fields(EngineConfig, tmp_path) == []


class EngineConfigWithANewField(EngineConfig):
    """EngineConfig as it would be with one more option that the entry points were not built from."""

    new_knob: int = 0


def test_a_field_the_entry_points_do_not_carry_fails_the_check(tmp_path, capsys):
    missing = unreachable_fields(EngineConfigWithANewField, tmp_path)
    assert missing and all(entry.startswith("new_knob from ") for entry in missing), missing
    assert len(missing) == 4, missing  # the CLI, the batch job, a flat pool and a nested one


def test_yaml_written_before_the_engine_mapping_keeps_its_meaning():
    old = PoolConfig(
        name="p",
        model="tiny-flux",
        parallel="ring=2",
        loras=["/loras/style:0.8"],
        vae_parallel=False,
        compile=True,
    )
    nested = PoolConfig(
        name="p",
        engine={
            "model": "tiny-flux",
            "parallel": "ring=2",
            "loras": ["/loras/style:0.8"],
            "vae_parallel": False,
            "compile": True,
        },
    )
    assert old == nested
    assert old.engine.loras == ("/loras/style:0.8",) and old.engine.parallel == ParallelConfig(ring=2)
    assert PoolConfig(name="p", model="m").engine.parallel == ParallelConfig(ulysses=2), "a pool's default"
    assert PoolConfig.model_validate(old.model_dump(mode="json")) == old
    with pytest.raises(ValueError, match="both flat and under engine"):
        PoolConfig(name="p", model="m", engine={"model": "n"})


def test_a_bad_engine_option_names_its_flag_or_field():
    args = argparse.Namespace(model="tiny-flux", pipefusion_patches=-1)
    with pytest.raises(ConfigError, match=r"^--patches: "):
        engine_config_from_args(args)
    with pytest.raises(ValueError, match="pipefusion"):
        PoolConfig(name="p", model="m", parallel="pipefusion=2", cache_threshold=0.1)
