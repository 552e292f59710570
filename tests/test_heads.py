"""Loss values of the heads against hand-computed ones, including same-group soft positives."""

import math

import pytest
import torch
import torch.nn.functional as F

from coalign import QueryFeatures, TargetFeatures
from coalign.heads import ContextualAlignmentHead, TokenReasoningHead, max_over_embeddings, soft_positive_targets


def _features(q, t):
    q = torch.tensor(q, dtype=torch.float32)
    t = torch.tensor(t, dtype=torch.float32)
    return QueryFeatures(q, q[:, None, :]), TargetFeatures(t[:, None, :], t[:, None, :])


def test_max_over_embeddings_takes_best_of_k():
    q = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[[0.0, 1.0], [0.6, 0.8]], [[-1.0, 0.0], [0.0, -1.0]]])  # [2, K=2, 2]
    assert torch.allclose(max_over_embeddings(q, t), torch.tensor([[0.6, 0.0]]))


def test_soft_targets_by_hand():
    y = soft_positive_targets(torch.tensor([0, 0, 0, 1]), 4, beta=0.2)
    expected = torch.tensor([[0.8, 0.1, 0.1, 0.0], [0.1, 0.8, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(y, expected)
    # a duplicated target image is a positive, never a negative of itself
    y = soft_positive_targets(None, 3, beta=0.2, target_ids=torch.tensor([7, 8, 7]))
    assert torch.allclose(y, torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]))


def test_infonce_value_by_hand():
    # two orthonormal pairs: s = [[1, 0], [0, 1]], tau = 0.5 -> loss = -log(e^2 / (e^2 + 1))
    q, t = _features([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    head = ContextualAlignmentHead(beta=0.0, init_temperature=0.5)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert head(q, t).item() == pytest.approx(expected, rel=1e-5)


def test_soft_positive_loss_by_hand():
    # three triplets, the first two of one group. s_ij = cosine; tau = 1.
    q, t = _features([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    s = torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.8], [0.6, 0.8, 1.0]])
    logp = F.log_softmax(s, dim=1)
    beta = 0.3
    y = torch.tensor([[0.7, 0.3, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    expected = -(y * logp).sum(1).mean()
    head = ContextualAlignmentHead(beta=beta, init_temperature=1.0)
    assert head(q, t, torch.tensor([5, 5, 9])).item() == pytest.approx(expected.item(), rel=1e-5)
    # symmetric adds the transposed direction
    sym = ContextualAlignmentHead(beta=beta, init_temperature=1.0, symmetric=True)
    expected_sym = 0.5 * (expected - (y.T * F.log_softmax(s.T, dim=1)).sum(1).mean())
    assert sym(q, t, torch.tensor([5, 5, 9])).item() == pytest.approx(expected_sym.item(), rel=1e-5)


def test_temperature_learns_and_can_be_frozen():
    q, t = _features([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    head = ContextualAlignmentHead()
    head(q, t).backward()
    assert head.log_temperature.grad is not None
    assert not ContextualAlignmentHead(learn_temperature=False).log_temperature.requires_grad


@pytest.mark.parametrize("kwargs", [{"beta": 1.0}, {"beta": -0.1}, {"init_temperature": 0.0}])
def test_global_head_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ContextualAlignmentHead(**kwargs)


def test_token_reasoning_score_by_hand():
    head = TokenReasoningHead(token_dim=2, projection_dim=None, top_k=2, mask_ratio=0.0)
    # query tokens u1=(1,0), u2=(0,1), u3=(-1,0) (u3 masked out); target tokens v1=(1,0), v2=(0.6,0.8)
    q = QueryFeatures(
        torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]]), torch.tensor([[True, True, False]])
    )
    t = TargetFeatures(torch.zeros(1, 1, 2), torch.tensor([[[1.0, 0.0], [0.6, 0.8]]]))
    # a = [max(1, .6), max(0, .8)] = [1, .8] -> mean of top-2 = .9
    assert head.score(q, t).item() == pytest.approx(0.9, rel=1e-5)
    assert head.score_pairs(q, t.tokens[None]).item() == pytest.approx(0.9, rel=1e-5)


def test_token_reasoning_loss_and_masking():
    head = TokenReasoningHead(token_dim=8, projection_dim=8, top_k=3, mask_ratio=0.5)
    q = QueryFeatures(torch.zeros(4, 8), torch.randn(4, 5, 8))
    t = TargetFeatures(torch.zeros(4, 1, 8), torch.randn(4, 6, 8))
    head.train()
    loss = head(q, t, torch.tensor([0, 0, 1, 2]))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert head.projection.weight.grad is not None
    head.eval()
    assert torch.equal(head(q, t), head(q, t))  # no masking at eval: deterministic


def test_hard_negatives_add_zero_target_columns():
    q, t = _features([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    n = TargetFeatures(torch.tensor([[[0.6, 0.8]]]), torch.tensor([[[0.6, 0.8]]]))
    head = ContextualAlignmentHead(beta=0.0, init_temperature=1.0)
    s = torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.8]])
    expected = -F.log_softmax(s, dim=1).diagonal().mean()
    assert head(q, t, negatives=n).item() == pytest.approx(expected.item(), rel=1e-5)
    assert head(q, t, negatives=n).item() > head(q, t).item()  # a hard negative makes the task harder
    local = TokenReasoningHead(token_dim=2, projection_dim=None, top_k=1, mask_ratio=0.0, init_temperature=1.0)
    expected_local = -F.log_softmax(s, dim=1).diagonal().mean()  # one token each: local score == cosine
    assert local(q, t, negatives=n).item() == pytest.approx(expected_local.item(), rel=1e-5)
