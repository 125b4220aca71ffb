import pytest

from rayxdit.config import ConfigError, ParallelConfig
from rayxdit.parallel.mesh import axis_groups, coords_rank, rank_coords


def test_parse_and_describe():
    config = ParallelConfig.parse(" ulysses=2, cfg=2,ring=2 ")
    assert (config.cfg, config.pipefusion, config.ring, config.ulysses) == (2, 1, 2, 2)
    assert config.world_size == 8 and config.sequence_parallel_size == 4
    assert config.describe() == "cfg(2) * pipefusion(1) * ring(2) * ulysses(2) = 8"
    assert str(config) == "cfg=2,ring=2,ulysses=2"
    assert ParallelConfig.parse("") == ParallelConfig.parse("single") == ParallelConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tensor=2", "unknown parallel method 'tensor'"),
        ("ring=x", "must be an integer"),
        ("ring", "not of the form method=degree"),
        ("ulysses=0", "positive integer"),
        ("cfg=4", "cfg must be 1 or 2"),
        ("ring=2,ring=2", "given twice"),
    ],
)
def test_parse_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig.parse(text)


def test_world_size_and_heads_errors_spell_out_the_product():
    with pytest.raises(
        ConfigError, match=r"cfg\(2\) \* pipefusion\(1\) \* ring\(1\) \* ulysses\(2\) = 4 != world size 2"
    ):
        ParallelConfig(cfg=2, ulysses=2).check_world_size(2)
    with pytest.raises(
        ConfigError, match=r"ulysses=5 does not divide the model's 24 attention heads; use one of"
    ):
        ParallelConfig(ulysses=5).check_heads(24)
    ParallelConfig(ulysses=6).check_heads(24)


def test_rank_layout_roundtrip_and_ulysses_innermost():
    config = ParallelConfig(cfg=2, pipefusion=2, ulysses=4)
    for rank in range(config.world_size):
        assert coords_rank(config, rank_coords(config, rank)) == rank
    assert rank_coords(config, 1) == {"cfg": 0, "pipefusion": 0, "ring": 0, "ulysses": 1}
    assert rank_coords(config, 4) == {"cfg": 0, "pipefusion": 1, "ring": 0, "ulysses": 0}
    assert rank_coords(config, 8) == {"cfg": 1, "pipefusion": 0, "ring": 0, "ulysses": 0}
    usp = ParallelConfig(ring=2, ulysses=2)
    assert [rank_coords(usp, r)["ring"] for r in range(4)] == [0, 0, 1, 1]


def test_axis_groups_partition_the_world():
    config = ParallelConfig(cfg=2, ring=2, ulysses=2)
    assert axis_groups(config, "ulysses") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert axis_groups(config, "ring") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert axis_groups(config, "cfg") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert axis_groups(config, "sp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for axis in ("cfg", "pipefusion", "ring", "ulysses", "sp"):
        members = sorted(rank for group in axis_groups(config, axis) for rank in group)
        assert members == list(range(8)), axis
