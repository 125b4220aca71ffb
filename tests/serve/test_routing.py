import json
from pathlib import Path

import pytest

from rayxdit.limits import ModelLimits
from rayxdit.models.families import FLUX, FLUX_KONTEXT
from rayxdit.request import GenerateRequest, RequestError
from rayxdit.serve.api import ImageGenerationRequest
from rayxdit.serve.routing import (
    PoolLoad,
    PoolSpec,
    adapter_tiers,
    pick_version,
    request_cost,
    sample_cost,
    threshold_order,
    version_draw,
)

POOLS = [
    PoolSpec("p2", "m", 2, route_min_cost=0),
    PoolSpec("p4", "m", 4, route_min_cost=40),
    PoolSpec("p8", "m", 8, route_min_cost=100),
]


def resolved(size=1024, steps=28, cfg=False, n=1):
    request = GenerateRequest(
        prompt="x",
        height=size,
        width=size,
        steps=steps,
        num_images=n,
        negative_prompt="y" if cfg else None,
        true_cfg_scale=4.0 if cfg else 1.0,
    )
    return ModelLimits().resolve(request)


def test_cost_counts_pixels_steps_cfg_and_images():
    assert request_cost(resolved(), False, 0.0) == pytest.approx(1024 * 1024 / 1e6 * 28)
    assert request_cost(resolved(cfg=True, n=2), True, 0.0) == pytest.approx(4 * 1024 * 1024 / 1e6 * 28)
    # A cost unit is a step of a one-megapixel image whatever the attention term; smaller ones cost less.
    assert sample_cost(1.0, 1, False, 0.117) == pytest.approx(1.0)
    assert sample_cost(0.25, 1, False, 0.117) < 0.25 < sample_cost(0.25, 1, False, 0.0) + 1e-9


def test_flux_s_attention_term_prices_2048px_as_it_was_measured_to_take():
    """A 2048px image took 5.31 times a 1024px one on one H200, not 4: the cost routing and the fitted
    service times count in must say so (else a pool's rate follows its share of 2048px requests)."""
    runs = json.loads((Path(__file__).parents[2] / "benchmarks/results/flux-dev-2xh200.json").read_text())
    single = {
        run["resolution"]: run["seconds"]
        for run in runs
        if run["impl"] == "single" and run["compile"] and not run["cfg"]
    }
    attention = FLUX.limits.attention_cost_per_megapixel
    priced = request_cost(resolved(2048), False, attention) / request_cost(resolved(1024), False, attention)
    assert priced == pytest.approx(single[2048] / single[1024], rel=0.01)
    assert FLUX_KONTEXT.limits.attention_cost_per_megapixel == attention


def test_a_model_s_settings_may_set_its_attention_term_but_not_a_negative_one():
    assert ModelLimits().updated({"attention_cost_per_megapixel": 0.2}).attention_cost_per_megapixel == 0.2
    for bad in (-0.1, "0.1", True):
        with pytest.raises(ValueError, match="attention_cost_per_megapixel must be a number >= 0"):
            ModelLimits().updated({"attention_cost_per_megapixel": bad})


def test_whether_a_request_runs_cfg_is_the_family_s_call():
    from rayxdit.models.flux import FluxAdapter
    from rayxdit.models.sd3 import SD3Adapter

    plain = GenerateRequest(prompt="x", guidance=7.0)
    assert not FluxAdapter.uses_cfg(plain) and SD3Adapter.uses_cfg(plain)
    assert FluxAdapter.uses_cfg(plain.model_copy(update={"negative_prompt": "y", "true_cfg_scale": 4.0}))


@pytest.mark.parametrize(
    ("cost", "pool"), [(0.0, "p2"), (29.4, "p2"), (40.0, "p4"), (58.7, "p4"), (117.4, "p8")]
)
def test_thresholds_pick_the_pool(cost, pool):
    assert threshold_order(POOLS, cost, {})[0].name == pool


def test_saturated_pool_yields_to_the_nearest():
    loads = {
        "p2": PoolLoad(ready_replicas=2, outstanding=2),
        "p4": PoolLoad(ready_replicas=1, outstanding=0),
        "p8": PoolLoad(ready_replicas=1, outstanding=0),
    }
    assert [p.name for p in threshold_order(POOLS, 10.0, loads)] == ["p4", "p8", "p2"]
    loads = {
        "p2": PoolLoad(ready_replicas=1, outstanding=0),
        "p4": PoolLoad(ready_replicas=1, outstanding=0),
        "p8": PoolLoad(ready_replicas=1, outstanding=1),
    }
    order = threshold_order([POOLS[0], POOLS[2]], 200.0, loads)
    assert [p.name for p in order] == ["p2", "p8"]


def test_a_cold_pool_is_not_free_but_still_takes_requests_nobody_else_can():
    """Capacity is the replicas that are up, not max_replicas: a pool scaled to zero is not free."""
    warm_small = {
        "p2": PoolLoad(ready_replicas=1, outstanding=0),
        "p8": PoolLoad(ready_replicas=0, outstanding=0),
    }
    assert [p.name for p in threshold_order(POOLS, 200.0, warm_small)][:1] == ["p2"]
    assert [p.name for p in threshold_order([POOLS[2]], 200.0, warm_small)] == ["p8"]


def test_missing_pool_size_falls_back_to_nearest():
    only_small_and_big = [POOLS[0], POOLS[2]]
    assert [p.name for p in threshold_order(only_small_and_big, 50.0, {})] == ["p2", "p8"]


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("1024", "not of the form WIDTHxHEIGHT"),
        ("axb", "not of the form"),
        ("0x0", "zero side"),
        ("-5x5", "not of the form"),
    ],
)
def test_size_parsing_errors_name_the_size(size, message):
    with pytest.raises(RequestError, match=message) as error:
        ImageGenerationRequest(prompt="x", size=size).to_generate_request(default_seed=0)
    assert error.value.param == "size"


def test_size_is_width_by_height():
    request = ImageGenerationRequest(prompt="x", size="640x384", n=2, seed=9).to_generate_request(
        default_seed=0
    )
    assert (request.width, request.height, request.num_images, request.seed) == (640, 384, 2, 9)


def test_adapter_tiers_prefer_holders_then_homes_and_open_up_after_the_patience():
    replicas = [(f"r{i}", frozenset({"ink"} if i == 3 else ())) for i in range(6)]
    everyone = [name for name, _ in replicas]
    assert adapter_tiers(replicas, None, 0.0) == [everyone]  # no adapters: anywhere
    early = adapter_tiers(replicas, "ink", 0.0, patience_s=1.0, homes=2)
    ink_homes = adapter_tiers([(name, frozenset()) for name in everyone], "ink", 0.0, homes=2)[0]
    assert early == [["r3"], [name for name in ink_homes if name != "r3"]], "holders, then homes, only"
    late = adapter_tiers(replicas, "ink", 1.5, patience_s=1.0, homes=2)
    assert late[:2] == early and sorted(name for tier in late for name in tier) == everyone
    # Homes are the same in every process and stay put when another replica joins or leaves.
    homes = adapter_tiers(replicas, "glow", 0.0, homes=2)[0]
    assert adapter_tiers(replicas, "glow", 0.0, homes=2)[0] == homes
    fewer = [replica for replica in replicas if replica[0] not in homes[1:]]
    assert adapter_tiers(fewer, "glow", 0.0, homes=2)[0][0] == homes[0]
    assert adapter_tiers([*replicas, ("r9", frozenset())], "glow", 0.0, homes=2)[0] in (
        homes,
        ["r9", homes[0]],
        [homes[0], "r9"],
    )
    # Sets spread: 200 adapter sets over 6 replicas, none gets more than twice its share as a first home.
    firsts = [adapter_tiers(replicas, f"set{i}", 0.0, homes=1)[0][0] for i in range(200)]
    assert max(firsts.count(name) for name in everyone) < 2 * 200 / 6


def test_versions_share_unpinned_requests_by_weight_and_a_request_keeps_its_version():
    weights = {"1": 95.0, "2": 5.0}
    picks = [pick_version(weights, version_draw(f"request-{i}")) for i in range(4000)]
    assert abs(picks.count("2") / len(picks) - 0.05) < 0.01
    assert pick_version(weights, version_draw("same id")) == pick_version(weights, version_draw("same id"))
    # The shares' edges, in sorted version order; a 0-weight version takes none.
    assert [pick_version(weights, draw) for draw in (0.0, 0.9499, 0.9501, 0.999999)] == ["1", "1", "2", "2"]
    assert {pick_version({"1": 0.0, "2": 1.0}, draw) for draw in (0.0, 0.5, 0.999)} == {"2"}
    assert {pick_version({"a": 50.0, "b": 0.0, "c": 50.0}, d) for d in (0.0, 0.49, 0.5, 0.99)} == {"a", "c"}
