"""Students extracted from the bank answer as the bank does; the aggregator averages replicas,
fills lost parts with their training mean, and classifies with any subset of members."""

from __future__ import annotations

import itertools

import pytest
import torch

from edgesplit.partitioner.nonn.partition import Partition
from edgesplit.partitioner.nonn.students import Aggregator, StudentBank

ENHANCED = Partition("enhanced", ((0, 2, 4), (1, 3, 5)), (0, 1, 0, 1))
ORIGINAL = Partition("original", ((0, 1, 2, 3), (4,), (5,)), (0, 1, 2))


@pytest.mark.parametrize("partition", [ENHANCED, ORIGINAL])
def test_extracted_members_answer_like_the_bank(partition):
    torch.manual_seed(0)
    bank = StudentBank(partition, widths=(2, 3, 4))
    with torch.no_grad():  # make the batch-norm statistics differ per member
        for m in bank.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    bank.eval()
    x = torch.randn(5, 1, 28, 28)
    answers = bank(x)
    for i in range(partition.members):
        student = bank.member(i)
        assert student.filters == len(partition.member_filters(i))
        torch.testing.assert_close(student(x), answers[i], atol=1e-5, rtol=1e-5)


def expected_features(partition, mean, answers, present):
    out = mean.clone()
    for p, filters in enumerate(partition.parts):
        got = [answers[i] for i in partition.replicas(p) if i in present]
        if got:
            out[list(filters)] = torch.stack(got).mean(0)
    return out


@pytest.mark.parametrize("partition", [ENHANCED, ORIGINAL])
def test_aggregator_with_every_subset_of_members(partition):
    torch.manual_seed(1)
    mean = torch.randn(partition.filters)
    agg = Aggregator(partition, mean).eval()
    answers = {i: torch.randn(1, len(partition.member_filters(i))) for i in range(partition.members)}
    for k in range(1, partition.members + 1):
        for subset in itertools.combinations(range(partition.members), k):
            logits = agg.combine({i: answers[i] for i in subset})
            want = expected_features(partition, mean, {i: answers[i][0] for i in subset}, set(subset))
            torch.testing.assert_close(logits[0], agg.classifier(want))


def test_aggregator_mask_rows_are_independent():
    agg = Aggregator(ENHANCED, torch.zeros(6)).eval()
    answers = [torch.full((2, 3), float(i + 1)) for i in range(4)]
    present = torch.tensor([[1.0, 1, 1, 1], [0, 0, 1, 0]])
    f = agg.features(answers, present)
    assert f[0, [0, 2, 4]].tolist() == [2.0, 2.0, 2.0]  # members 0 and 2 averaged: (1 + 3) / 2
    assert f[0, [1, 3, 5]].tolist() == [3.0, 3.0, 3.0]  # members 1 and 3: (2 + 4) / 2
    assert f[1, [0, 2, 4]].tolist() == [3.0, 3.0, 3.0] and f[1, [1, 3, 5]].tolist() == [0.0, 0.0, 0.0]


def test_an_absent_members_placeholder_never_leaks_in_even_nan():
    agg = Aggregator(ENHANCED, torch.zeros(6)).eval()
    answers = [torch.full((1, 3), float("nan")), torch.ones(1, 3), torch.full((1, 3), 2.0), torch.ones(1, 3)]
    f = agg.features(answers, torch.tensor([[0.0, 1, 1, 1]]))
    assert torch.isfinite(f).all() and f[0, [0, 2, 4]].tolist() == [2.0, 2.0, 2.0]


def test_aggregator_refuses_bad_answers():
    agg = Aggregator(ENHANCED, torch.zeros(6))
    with pytest.raises(ValueError, match="no member answered"):
        agg.combine({})
    with pytest.raises(ValueError, match="member 1 answered shape"):
        agg.combine({0: torch.zeros(1, 3), 1: torch.zeros(1, 4)})
    with pytest.raises(ValueError, match=r"members \[7\] are not in this ensemble"):
        agg.combine({7: torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="filter_mean"):
        Aggregator(ENHANCED, torch.zeros(5))
