"""Network of Neural Networks (NoNN): a teacher's final filters split across small students.

Each student runs on its own device and reproduces the activations of one group of the
teacher's final convolutional filters; an aggregator combines whatever students answered
and classifies. Two partitionings of the filters:

- ``original``: the filter co-activation graph split into communities (Louvain), one
  community per student, as in the original NoNN;
- ``enhanced``: balanced eigenvector-based (spectral) partitioning into ``M <= S/2`` parts
  of equal size (within one filter), student ``i`` learning part ``i mod M``; replicas of a
  part are averaged, so a part is lost only when all of its students are.

Example::

    >>> import numpy as np
    >>> from edgesplit.partitioner.nonn.partition import balanced_spectral_partition
    >>> graph = np.ones((8, 8)) - np.eye(8)
    >>> p = balanced_spectral_partition(graph, members=4)
    >>> [len(part) for part in p.parts], p.member_part
    ([4, 4], (0, 1, 0, 1))
"""
