import torch

from rayxdit.parallel.sequence import shard, shard_bounds, split_sizes


def test_split_sizes_uneven():
    assert split_sizes(81, 4) == [21, 20, 20, 20]
    assert split_sizes(29, 8) == [4, 4, 4, 4, 4, 3, 3, 3]
    assert split_sizes(8, 8) == [1] * 8
    assert sum(split_sizes(4096 + 512, 3)) == 4608


def test_shards_concatenate_back():
    x = torch.arange(2 * 29 * 3).reshape(2, 29, 3)
    parts = [shard(x, 1, 4, i) for i in range(4)]
    assert [p.shape[1] for p in parts] == split_sizes(29, 4)
    assert torch.equal(torch.cat(parts, dim=1), x)
    assert shard_bounds(29, 4, 3) == (22, 29)
