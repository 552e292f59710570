"""The examples behind the picture of results: collected a few per batch, ranks and scores right, drawn with the
missed target shown."""

from types import SimpleNamespace

import torch

from coalign.evaluation.pictures import MAX_EXAMPLES, collect_examples, draw_examples, picture_title


class _Gallery:
    def __init__(self, ids):
        self.entries = [(i, f"{i}.png") for i in ids]

    def __getitem__(self, i):
        return {"image": torch.full((3, 32, 32), float(i) / 10)}


def _batch(n, targets, references):
    return {
        "reference": torch.zeros(n, 3, 32, 32),
        "text": [f"text {i}" for i in range(n)],
        "target_id": targets,
        "reference_id": references,
    }


def test_collect_examples_records_rank_scores_and_ids():
    ids = ["a", "b", "c", "d"]
    index = torch.tensor([[2, 0, 1, 3], [1, 3, 0, 2], [0, 1, 2, 3]])
    scores = torch.tensor([[0.9, 0.5, 0.2, 0.1], [0.8, 0.7, 0.3, 0.0], [0.6, 0.4, 0.3, 0.2]])
    examples = []
    collect_examples(examples, _batch(3, ["c", "a", "z"], ["r0", "r1", None]), index, scores, ids, per_batch=3)
    assert [e["target_rank"] for e in examples] == [1, 3, None]  # "z" is not in the ranking
    assert examples[1]["ranked_ids"] == ["b", "d", "a", "c"]
    assert examples[1]["ranked_scores"] == [0.8, 0.7, 0.3, 0.0]
    assert [e["reference_id"] for e in examples] == ["r0", "r1", None]


def test_collect_examples_takes_a_few_per_batch_up_to_the_limit():
    ids = ["a", "b"]
    examples = []
    for _ in range(40):
        collect_examples(examples, _batch(8, ["a"] * 8, ["r"] * 8), torch.tensor([[0, 1]] * 8), torch.ones(8, 2), ids)
    assert len(examples) == MAX_EXAMPLES  # 4 per batch, then nothing more


def test_draw_examples_adds_the_missed_target_column(tmp_path):
    ids = [f"g{i}" for i in range(8)]
    examples = []
    index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 0]])
    collect_examples(examples, _batch(2, ["g0", "g0"], ["x", "y"]), index, torch.rand(2, 8), ids)
    hit_only = draw_examples(examples[:1], _Gallery(ids), [0.5] * 3, [0.5] * 3, tmp_path / "a.png", top_k=5)
    with_miss = draw_examples(examples, _Gallery(ids), [0.5] * 3, [0.5] * 3, tmp_path / "b.png", top_k=5)
    assert (tmp_path / "b.png").is_file()
    assert with_miss.width > hit_only.width  # one more column: the true target of the missed query
    assert with_miss.height > hit_only.height
    assert draw_examples([], _Gallery(ids), [0.5] * 3, [0.5] * 3, tmp_path / "c.png") is None
    assert draw_examples(examples, SimpleNamespace(), [0.5] * 3, [0.5] * 3, tmp_path / "c.png") is None


def test_picture_title_finds_r_at_1_under_a_prefix():
    assert picture_title("test", {"shapes/R@10": 99.0, "shapes/R@1": 94.667}) == "test: R@1 94.67%"
    assert picture_title("val", {"circo/mAP@5": 3.0}) == "val"
