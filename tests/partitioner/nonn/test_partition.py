"""Both partitionings: exact cover, balance, determinism, replicas i mod M, planted structure found."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.partitioner.nonn.partition import (
    Partition,
    PartitionError,
    balanced_spectral_partition,
    build_partition,
    louvain_partition,
)
from edgesplit.partitioner.nonn.stats import filter_graph


def planted_graph(blocks: int, size: int, seed: int = 0, inside: float = 0.8, outside: float = 0.05) -> np.ndarray:
    """Filters in ``blocks`` clusters of ``size``, strongly tied inside, weakly across, shuffled labels."""
    rng = np.random.default_rng(seed)
    n = blocks * size
    label = rng.permutation(np.repeat(np.arange(blocks), size))
    same = label[:, None] == label[None, :]
    graph = np.where(same, inside, outside) * rng.uniform(0.8, 1.2, (n, n))
    graph = (graph + graph.T) / 2
    np.fill_diagonal(graph, 0)
    return graph, label


def random_graph(n: int = 64, seed: int = 1) -> np.ndarray:
    a = np.random.default_rng(seed).random((n, n))
    g = (a + a.T) / 2
    np.fill_diagonal(g, 0)
    return g


@pytest.mark.parametrize("members,parts", [(4, 2), (8, 4), (8, 3), (6, 3), (8, 1), (2, 1)])
def test_enhanced_is_balanced_and_replicas_follow_i_mod_m(members, parts):
    p = balanced_spectral_partition(random_graph(), members, parts)
    sizes = [len(x) for x in p.parts]
    assert len(sizes) == parts and max(sizes) - min(sizes) <= 1
    assert sorted(f for x in p.parts for f in x) == list(range(64))
    assert p.member_part == tuple(i % parts for i in range(members))
    for part in range(parts):
        assert p.replicas(part) == [i for i in range(members) if i % parts == part]


def test_enhanced_defaults_to_half_as_many_parts_as_members():
    assert len(balanced_spectral_partition(random_graph(), 8).parts) == 4
    with pytest.raises(PartitionError, match="parts"):
        balanced_spectral_partition(random_graph(), 8, parts=5)


@pytest.mark.parametrize("method", ["original", "enhanced"])
def test_partitions_are_deterministic(method):
    g = random_graph(seed=3)
    first = build_partition(method, g, 8, seed=7)
    assert first == build_partition(method, g.copy(), 8, seed=7)
    assert Partition.from_dict(first.to_dict()) == first


def test_enhanced_keeps_planted_clusters_together():
    graph, label = planted_graph(4, 16)
    p = balanced_spectral_partition(graph, members=8, parts=4)
    assert sorted(len({label[f] for f in part}) for part in p.parts) == [1, 1, 1, 1]


def test_original_gives_one_group_per_member_from_the_graph_communities():
    graph, label = planted_graph(4, 16, seed=2)
    p = louvain_partition(graph, members=4, seed=0)
    assert p.member_part == (0, 1, 2, 3)
    assert sorted(len({label[f] for f in part}) for part in p.parts) == [1, 1, 1, 1]
    # More members than communities: the partition still covers every filter, one group per member.
    p8 = louvain_partition(graph, members=8, seed=0)
    assert len(p8.parts) == 8 and sorted(f for x in p8.parts for f in x) == list(range(64))


def test_original_groups_follow_the_graph_not_a_size_target():
    graph, _ = planted_graph(3, 10, seed=4)  # three communities of 10 for 2 members: one group must be larger
    p = louvain_partition(graph, members=2, seed=0)
    assert sorted(len(x) for x in p.parts) == [10, 20]


def test_invalid_inputs_are_refused_with_reasons():
    with pytest.raises(PartitionError, match="square"):
        balanced_spectral_partition(np.ones((3, 4)), 2)
    with pytest.raises(PartitionError, match="non-negative"):
        louvain_partition(-np.ones((4, 4)), 2)
    with pytest.raises(PartitionError, match="cannot give"):
        louvain_partition(random_graph(4), 5)
    with pytest.raises(PartitionError, match="cover"):
        Partition("enhanced", ((0, 1), (1, 2)), (0, 1))
    with pytest.raises(PartitionError, match="at least one member"):
        Partition("enhanced", ((0,), (1,)), (0, 0))
    with pytest.raises(PartitionError, match="unknown"):
        build_partition("spectral", random_graph(), 4)


def test_filter_graph_is_positive_correlation_with_dead_filters_isolated():
    rng = np.random.default_rng(0)
    base = rng.random(500)
    pooled = np.stack([base, 2 * base + 1, -base, np.full(500, 3.0)], axis=1)
    g = filter_graph(pooled)
    assert g[0, 1] == pytest.approx(1.0) and g[0, 2] == 0.0 and not g[3].any()
    assert np.allclose(g, g.T) and not np.diag(g).any()
    p = balanced_spectral_partition(g, members=4, parts=2)  # the dead filter is still placed
    assert sorted(f for x in p.parts for f in x) == [0, 1, 2, 3]


def test_balanced_assignment_is_optimal_on_small_problems():
    import itertools

    from edgesplit.partitioner.nonn.partition import _balanced_assignment

    rng = np.random.default_rng(5)
    for _ in range(5):
        cost = rng.random((8, 3))
        sizes = [3, 3, 2]
        label = _balanced_assignment(cost, sizes)
        assert np.bincount(label, minlength=3).tolist() == sizes
        slots = [c for c, n in enumerate(sizes) for _ in range(n)]
        best = min(sum(cost[i, c] for i, c in enumerate(p)) for p in set(itertools.permutations(slots)))
        assert cost[np.arange(8), label].sum() == pytest.approx(best)
