"""Loss values of the heads against hand-computed ones, including same-group soft positives."""

import math

import pytest
import torch
import torch.nn.functional as F

from coalign import CoAlign, QueryFeatures, TargetFeatures
from coalign.backbones import TinyBackbone
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


# One group, four triplets: source->edit1, edit1->source, source->edit2, edit2->source. Image codes (in the order
# CoAlign._losses meets the targets): edit1 = 0, source = 1, edit2 = 2. Targets [E1, S, E2, S]; references
# [S, E1, S, E2].
GROUP_TARGETS = torch.tensor([0, 1, 2, 1])
GROUP_REFERENCES = torch.tensor([1, 0, 1, 2])
GROUP = torch.tensor([7, 7, 7, 7])
# beta = 0.2, by hand. Row 0 (S->E1): positive E1 (0.8); other targets of the group: S, E2, S, but S is its own
# reference, so E2 alone takes 0.2. Row 1 (E1->S): the two S targets are one image, its positive, 0.8 / 2 each;
# E1 is its reference (weight 0, a negative), so E2 takes 0.2. Rows 2 and 3 mirror rows 0 and 1 with E1 <-> E2.
EXPECTED_GROUP_Y = torch.tensor(
    [
        [0.8, 0.0, 0.2, 0.0],
        [0.0, 0.4, 0.2, 0.4],
        [0.2, 0.0, 0.8, 0.0],
        [0.2, 0.4, 0.0, 0.4],
    ]
)


def test_soft_positives_are_never_the_querys_own_reference():
    y = soft_positive_targets(GROUP, 4, beta=0.2, target_ids=GROUP_TARGETS, reference_ids=GROUP_REFERENCES)
    assert torch.allclose(y, EXPECTED_GROUP_Y)
    # without reference ids a forward query's soft positives include the source, i.e. its own reference:
    # row 0 spreads 0.2 over {S, E2, S} -> 1/15 each
    y_old = soft_positive_targets(GROUP, 4, beta=0.2, target_ids=GROUP_TARGETS)
    assert torch.allclose(y_old[0], torch.tensor([0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3]))
    # a reference that is no target of the batch (code -1) excludes nothing; beta = 0 stays InfoNCE
    y = soft_positive_targets(GROUP, 4, 0.2, target_ids=GROUP_TARGETS, reference_ids=torch.full((4,), -1))
    assert torch.allclose(y, y_old)
    y = soft_positive_targets(GROUP, 4, 0.0, target_ids=GROUP_TARGETS, reference_ids=GROUP_REFERENCES)
    assert torch.allclose(y, torch.tensor([[1, 0, 0, 0], [0, 0.5, 0, 0.5], [0, 0, 1, 0], [0, 0.5, 0, 0.5]]))


def test_a_row_whose_only_peer_is_its_reference_is_plain_infonce():
    # a one-pair group (S->E, E->S): each query's only other target is its own reference
    y = soft_positive_targets(
        torch.tensor([0, 0]), 2, beta=0.3, target_ids=torch.tensor([0, 1]), reference_ids=torch.tensor([1, 0])
    )
    assert torch.allclose(y, torch.eye(2))


def test_reference_ids_need_target_ids_and_the_batch_size():
    with pytest.raises(ValueError, match="target_ids"):
        soft_positive_targets(GROUP, 4, beta=0.2, reference_ids=GROUP_REFERENCES)
    with pytest.raises(ValueError, match="3 reference ids for a batch of 4"):
        soft_positive_targets(GROUP, 4, beta=0.2, target_ids=GROUP_TARGETS, reference_ids=torch.tensor([0, 1, 2]))


def _group_features():
    # E1, S, E2 as 2-d unit vectors; queries point at their targets with some error
    e1, s, e2 = [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]
    return _features([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]], [e1, s, e2, s])


def test_both_heads_honour_reference_ids_by_hand():
    q, t = _group_features()
    s = q.embedding @ t.embedding[:, 0].T  # tau = 1
    expected = -(EXPECTED_GROUP_Y * F.log_softmax(s, dim=1)).sum(1).mean()
    ids = {"target_ids": GROUP_TARGETS, "reference_ids": GROUP_REFERENCES}
    head = ContextualAlignmentHead(beta=0.2, init_temperature=1.0)
    assert head(q, t, GROUP, **ids).item() == pytest.approx(expected.item(), rel=1e-5)
    assert head(q, t, GROUP, GROUP_TARGETS).item() != pytest.approx(expected.item(), rel=1e-3)
    # one token each, top_k 1, no mask: the local score is the cosine, so the local loss is the same number
    local = TokenReasoningHead(
        token_dim=2, projection_dim=None, top_k=1, mask_ratio=0.0, beta=0.2, init_temperature=1.0
    )
    assert local(q, t, GROUP, **ids).item() == pytest.approx(expected.item(), rel=1e-5)


def test_model_maps_reference_ids_into_the_target_code_space():
    backbone = TinyBackbone(channels=8, embed_dim=32, token_dim=16, text_layers=1, max_length=16)
    model = CoAlign(backbone, ContextualAlignmentHead(beta=0.2), TokenReasoningHead(mask_ratio=0.0, beta=0.2))
    model.eval()
    batch = {
        "reference": torch.rand(4, 3, 32, 32),
        "target": torch.rand(4, 3, 32, 32),
        "text": ["add a red circle", "remove the red circle", "make it blue", "make it green"],
        "target_id": ["e1", "src", "e2", "src"],
        "reference_id": ["src", "e1", "src", "e2"],
        "group": GROUP,
    }
    with torch.no_grad():
        losses = model._losses(batch)
        query, target = model.encode_queries(batch["reference"], batch["text"]), model.encode_targets(batch["target"])
        ids = {"target_ids": GROUP_TARGETS, "reference_ids": GROUP_REFERENCES}
        expected_global = model.global_head(query, target, GROUP, **ids)
        expected_local = model.local_head(query, target, GROUP, **ids)
        without_references = model.global_head(query, target, GROUP, GROUP_TARGETS)
    assert without_references.item() != pytest.approx(expected_global.item(), rel=1e-4)
    assert losses["global_loss"].item() == pytest.approx(expected_global.item(), rel=1e-5)
    assert losses["local_loss"].item() == pytest.approx(expected_local.item(), rel=1e-5)
