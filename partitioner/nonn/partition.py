"""Partitions of a teacher's final filters among NoNN students, and which student learns what.

``louvain_partition`` is the original NoNN partitioning: communities of the filter graph
(Louvain, seeded), merged or split until there is one per student; groups come out of
whatever size the graph gives. ``balanced_spectral_partition`` is the enhanced one: a
spectral embedding of the filters (eigenvectors of the normalised Laplacian), k-means
centres, and an assignment to the centres that gives every part the same number of
filters (within one), into ``M <= S/2`` parts; student ``i`` learns part ``i mod M``.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

METHODS = ("original", "enhanced")
# Added to every edge so a graph with dead filters stays connected (keeps the Laplacian sane).
_EPSILON = 1e-6


class PartitionError(ValueError):
    """A partition that cannot be built or does not describe a valid assignment."""


@dataclass(frozen=True)
class Partition:
    """Filter groups ("parts") and the part each member (student) learns."""

    method: str
    parts: tuple[tuple[int, ...], ...]
    member_part: tuple[int, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PartitionError(f"unknown partitioning {self.method!r}; use one of {METHODS}")
        flat = sorted(f for part in self.parts for f in part)
        if not self.parts or any(not part for part in self.parts) or flat != list(range(len(flat))):
            raise PartitionError("parts must be non-empty and cover filters 0..C-1 exactly once")
        if any(not 0 <= p < len(self.parts) for p in self.member_part):
            raise PartitionError(f"member_part {self.member_part} names a part outside 0..{len(self.parts) - 1}")
        if set(self.member_part) != set(range(len(self.parts))):
            raise PartitionError("every part needs at least one member")

    @property
    def members(self) -> int:
        return len(self.member_part)

    @property
    def filters(self) -> int:
        return sum(len(p) for p in self.parts)

    def replicas(self, part: int) -> list[int]:
        """The members that learn ``part``."""
        return [i for i, p in enumerate(self.member_part) if p == part]

    def member_filters(self, member: int) -> tuple[int, ...]:
        return self.parts[self.member_part[member]]

    def to_dict(self) -> dict:
        return {"method": self.method, "parts": [list(p) for p in self.parts],
                "member_part": list(self.member_part), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict) -> Partition:
        try:
            return cls(str(data["method"]), tuple(tuple(int(f) for f in p) for p in data["parts"]),
                       tuple(int(p) for p in data["member_part"]), int(data.get("seed", 0)))
        except (KeyError, TypeError) as exc:
            raise PartitionError(f"malformed partition: {exc}") from None


def _check_graph(graph: np.ndarray, members: int) -> np.ndarray:
    graph = np.asarray(graph, dtype=np.float64)
    if graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        raise PartitionError(f"the filter graph must be square, got shape {graph.shape}")
    if members < 1 or members > graph.shape[0]:
        raise PartitionError(f"cannot give {graph.shape[0]} filters to {members} members")
    if not np.all(np.isfinite(graph)) or (graph < 0).any():
        raise PartitionError("the filter graph needs finite, non-negative weights")
    return (graph + graph.T) / 2


def louvain_partition(graph: np.ndarray, members: int, seed: int = 0) -> Partition:
    """The original NoNN partitioning: one Louvain community of filters per member.

    The resolution grows until Louvain finds at least ``members`` communities; the
    smallest community is then merged into the one it is most strongly tied to until
    there are exactly ``members``. (If even a high resolution gives too few, the largest
    community is halved along filter order.) Member ``i`` learns group ``i``.
    """
    graph = _check_graph(graph, members)
    graph = graph + _EPSILON * (1 - np.eye(len(graph)))  # dead filters: tied weakly to everyone, not to nobody
    g = nx.from_numpy_array(graph)
    communities: list[set[int]] = []
    for resolution in (1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0):
        communities = [set(c) for c in nx.community.louvain_communities(g, weight="weight", resolution=resolution,
                                                                        seed=seed)]
        if len(communities) >= members:
            break
    while len(communities) > members:
        communities.sort(key=lambda c: (len(c), min(c)))
        smallest = communities.pop(0)
        ties = [graph[np.ix_(sorted(smallest), sorted(c))].sum() for c in communities]
        communities[int(np.argmax(ties))] |= smallest
    while len(communities) < members:
        communities.sort(key=lambda c: (-len(c), min(c)))
        largest = sorted(communities.pop(0))
        half = len(largest) // 2
        communities += [set(largest[:half]), set(largest[half:])]
    parts = tuple(tuple(sorted(c)) for c in sorted(communities, key=min))
    return Partition("original", parts, tuple(range(members)), seed)


def _spectral_embedding(graph: np.ndarray, dims: int) -> np.ndarray:
    """Rows of the ``dims`` smallest eigenvectors of the normalised Laplacian, each row unit length."""
    sub = graph + _EPSILON * (1 - np.eye(len(graph)))
    scale = 1.0 / np.sqrt(sub.sum(axis=1))
    laplacian = np.eye(len(graph)) - scale[:, None] * sub * scale[None, :]
    _, vectors = np.linalg.eigh(laplacian)
    embedding = vectors[:, :dims].copy()
    for column in embedding.T:  # eigenvectors have no sign: fix one so the result is reproducible
        if column[np.argmax(np.abs(column))] < 0:
            column *= -1
    return embedding / np.linalg.norm(embedding, axis=1, keepdims=True).clip(min=1e-12)


def _kmeans(points: np.ndarray, k: int, seed: int, restarts: int = 10, iterations: int = 100) -> np.ndarray:
    """Centres of ``k`` clusters (k-means++ starts, Lloyd iterations, the best of ``restarts``)."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centres = [points[rng.integers(len(points))]]
        while len(centres) < k:
            d2 = ((points[:, None] - np.array(centres)[None]) ** 2).sum(-1).min(axis=1)
            total = d2.sum()
            centres.append(points[rng.choice(len(points), p=d2 / total)] if total > 0 else points[len(centres)])
        centres = np.array(centres)
        for _ in range(iterations):
            label = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(axis=1)
            moved = np.array([points[label == c].mean(axis=0) if (label == c).any() else centres[c]
                              for c in range(k)])
            if np.allclose(moved, centres):
                break
            centres = moved
        inertia = ((points - centres[label]) ** 2).sum()
        if inertia < best_inertia - 1e-12:
            best, best_inertia = centres, inertia
    return best


def _min_cost_matching(cost: np.ndarray) -> np.ndarray:
    """Column of each row in a minimum-cost perfect matching of a square cost matrix (Hungarian method)."""
    n = len(cost)
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    owner = np.zeros(n + 1, dtype=int)  # owner[j]: the row (1-based) matched to column j; 0: none
    for row in range(1, n + 1):
        owner[0], j0 = row, 0
        best = np.full(n + 1, np.inf)
        came_from = np.zeros(n + 1, dtype=int)
        used = np.zeros(n + 1, dtype=bool)
        while owner[j0] != 0:
            used[j0] = True
            i0 = owner[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (reduced < best[1:])
            best[1:][better] = reduced[better]
            came_from[1:][better] = j0
            j1 = 1 + int(np.argmin(np.where(free, best[1:], np.inf)))
            delta = best[j1]
            u[owner[used]] += delta
            v[used] -= delta
            best[1:][free] -= delta
            j0 = j1
        while j0:
            j1 = came_from[j0]
            owner[j0] = owner[j1]
            j0 = j1
    column = np.zeros(n, dtype=int)
    column[owner[1:] - 1] = np.arange(n)
    return column


def _balanced_assignment(cost: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Assign row ``i`` to column ``label[i]`` with exactly ``sizes[c]`` rows per column, at least total cost.

    Column ``c`` becomes ``sizes[c]`` slots; a minimum-cost matching of rows to slots is exact.
    """
    slots = np.repeat(np.arange(cost.shape[1]), sizes)
    return slots[_min_cost_matching(cost[:, slots])]


def balanced_spectral_partition(graph: np.ndarray, members: int, parts: int | None = None,
                                seed: int = 0) -> Partition:
    """The enhanced partitioning: ``parts`` equal-size spectral parts, member ``i`` on part ``i mod parts``.

    The filters are embedded by the ``parts`` smallest eigenvectors of the graph's
    normalised Laplacian (rows normalised), clustered by k-means, and then assigned to the
    clusters' centres under the constraint that every part gets the same number of filters
    (within one), so correlated filters stay together and every device carries the same
    load. ``parts`` defaults to ``members // 2`` (every part learnt by two members or more)
    and must be at most ``members / 2`` unless ``members`` is 1.
    """
    graph = _check_graph(graph, members)
    parts = parts if parts is not None else max(1, members // 2)
    if parts < 1 or (members > 1 and parts > members // 2) or parts > len(graph):
        raise PartitionError(f"{members} members need 1 <= parts <= {max(1, members // 2)}, got {parts}")
    n = len(graph)
    sizes = [n // parts + (1 if k < n % parts else 0) for k in range(parts)]
    if parts == 1:
        groups = [list(range(n))]
    else:
        embedding = _spectral_embedding(graph, parts)
        centres = _kmeans(embedding, parts, seed)
        cost = ((embedding[:, None] - centres[None]) ** 2).sum(-1)
        label = _balanced_assignment(cost, sizes)
        groups = [sorted(int(i) for i in np.flatnonzero(label == c)) for c in range(parts)]
    groups.sort(key=min)
    return Partition("enhanced", tuple(tuple(g) for g in groups), tuple(i % parts for i in range(members)), seed)


def build_partition(method: str, graph: np.ndarray, members: int, parts: int | None = None,
                    seed: int = 0) -> Partition:
    """Either partitioning by name (``"original"`` or ``"enhanced"``)."""
    if method == "original":
        return louvain_partition(graph, members, seed)
    if method == "enhanced":
        return balanced_spectral_partition(graph, members, parts, seed)
    raise PartitionError(f"unknown partitioning {method!r}; use one of {METHODS}")
