"""Searching one's own images: Index build/load/search, resuming, bad files, multi-vector targets, the commands."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coalign.index as index_module
from coalign import CoAlign, Index, create_model
from coalign._features import TargetFeatures
from coalign.commands.search import index_command, search_command
from coalign.evaluation.topk import chunked_topk
from coalign.heads.base import max_over_embeddings
from coalign.index import list_images

TEXT = "make the square red"


def _tiny(seed: int = 0) -> CoAlign:
    torch.manual_seed(seed)
    return create_model("coalign_tiny", channels=8, embed_dim=32, text_layers=1).eval()


@pytest.fixture
def photos(tmp_path):
    """14 small images in nested folders, one corrupt file, one hidden file and one non-image."""
    root = tmp_path / "photos"
    rng = random.Random(0)
    for i in range(14):
        path = root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (40, 36), tuple(rng.randrange(256) for _ in range(3)))
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(20), rng.randrange(20), 30, 30))
        image.save(path)
    (root / "broken.jpg").write_bytes(b"not an image at all")
    (root / ".hidden.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def _brute_force(model, folder, paths, query_image, k):
    """The k best images other than the query, scored one by one with the model."""
    images = [Image.open(folder / p).convert("RGB") for p in paths]
    query = model.encode_queries([Image.open(query_image).convert("RGB")], [TEXT]).embedding
    scores = model.similarity(query, model.encode_targets(images).embedding)[0]
    top = scores.topk(len(paths))
    ranked = [(str(folder.resolve() / paths[i]), float(s)) for i, s in zip(top.indices.tolist(), top.values.tolist())]
    return [r for r in ranked if r[0] != str(query_image.resolve())][:k]


def test_build_load_and_search_are_exact_with_both_backends(photos, tmp_path):
    model = _tiny()
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        index = Index.build(model, photos, tmp_path / "idx", batch_size=3, shard_size=4, progress=False)
    assert len(index) == 14 and index.paths == [p for p in list_images(photos) if p != "broken.jpg"]
    assert [s["path"] for s in index.skipped] == ["broken.jpg"]
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["complete"] and info["num_images"] == 14 and info["model"]["fingerprint"]
    assert json.loads((tmp_path / "idx" / "paths.json").read_text()) == index.paths
    assert len(list((tmp_path / "idx" / "shards").glob("*.safetensors"))) == 4

    loaded = Index.load(tmp_path / "idx")
    assert loaded.paths == index.paths and torch.equal(loaded.embeddings, index.embeddings)
    query = photos / "img01.png"
    with torch.no_grad():
        expected = _brute_force(model, photos, index.paths, query, 5)
    for backend in ("torch", "faiss"):
        got = loaded.search(model, query, TEXT, k=5, backend=backend)
        assert [p for p, _ in got] == [p for p, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)
    kept = loaded.search(model, Image.open(query), TEXT, k=len(index) + 5)
    assert len(kept) == 14  # a PIL query is never excluded; k is capped at the index size


def test_interrupted_build_resumes_and_picks_up_new_images(photos, tmp_path, monkeypatch):
    model = _tiny()
    real_write, writes = index_module._write_shard, []

    def dying_write(path, pending):
        if len(writes) == 2:
            raise KeyboardInterrupt  # the run is killed while writing its third shard
        writes.append(path)
        real_write(path, pending)

    monkeypatch.setattr(index_module, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        Index.build(model, photos, tmp_path / "idx", batch_size=2, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="unfinished"):
        Index.load(tmp_path / "idx")
    monkeypatch.setattr(index_module, "_write_shard", real_write)

    encoded = []
    original = model.encode_targets
    monkeypatch.setattr(model, "encode_targets", lambda images: encoded.append(len(images)) or original(images))
    with pytest.warns(UserWarning):
        resumed = Index.build(model, photos, tmp_path / "idx", batch_size=2, shard_size=4, progress=False)
    assert sum(encoded) == 15 - 8  # 15 files (broken.jpg included), 8 covered by the two finished shards
    with pytest.warns(UserWarning):
        fresh = Index.build(model, photos, tmp_path / "fresh", batch_size=5, shard_size=100, progress=False)
    order = [fresh.paths.index(p) for p in resumed.paths]
    assert sorted(resumed.paths) == sorted(fresh.paths)
    torch.testing.assert_close(resumed.embeddings, fresh.embeddings[order], atol=1e-5, rtol=1e-5)

    Image.new("RGB", (30, 30), (1, 2, 3)).save(photos / "new.png")
    encoded.clear()
    with pytest.warns(UserWarning):
        grown = Index.build(model, photos, tmp_path / "idx", batch_size=2, shard_size=4, progress=False)
    assert sum(encoded) == 1 and len(grown) == 15 and "new.png" in grown.paths


def test_multi_vector_targets_rank_by_their_best_vector(photos, tmp_path, monkeypatch):
    model = _tiny()
    encode_target = model.backbone.encode_target

    def three_vectors(pixels):
        out = encode_target(pixels)
        e = out.embedding[:, 0]
        extra = [F.normalize(e.roll(shift, dims=-1) + 0.3 * e, dim=-1) for shift in (1, 5)]
        return TargetFeatures(torch.stack([e, *extra], dim=1), out.tokens)

    monkeypatch.setattr(model.backbone, "encode_target", three_vectors)
    with pytest.warns(UserWarning):
        index = Index.build(model, photos, tmp_path / "idx", shard_size=5, progress=False)
    assert index.embeddings.shape[1:] == (3, 32) and index.info["vectors_per_image"] == 3
    query = photos / "sub" / "img00.jpg"
    with torch.no_grad():
        expected = _brute_force(model, photos, index.paths, query, 7)
    for backend in ("faiss", "torch"):
        got = index.search(model, query, TEXT, k=7, backend=backend)
        assert [p for p, _ in got] == [p for p, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)


@pytest.mark.parametrize("vectors", [1, 4])
def test_chunked_topk_in_chunks_equals_one_big_topk(vectors):
    torch.manual_seed(1)
    database = F.normalize(torch.randn(1000, vectors, 16), dim=-1).squeeze(1)
    queries = F.normalize(torch.randn(7, 16), dim=-1)
    scores, index = chunked_topk(queries, database, k=10, chunk_rows=64)
    full = max_over_embeddings(queries, database).topk(10)
    assert torch.equal(index, full.indices)
    torch.testing.assert_close(scores, full.values)
    scores, index = chunked_topk(queries, database, k=10, similarity=max_over_embeddings, chunk_rows=333)
    assert torch.equal(index, full.indices)


def test_an_index_refuses_another_model(photos, tmp_path):
    model, other = _tiny(0), _tiny(1)
    with pytest.warns(UserWarning):
        index = Index.build(model, photos, tmp_path / "idx", progress=False)
    with pytest.raises(ValueError, match="built by another model"):
        index.search(other, photos / "img01.png", TEXT)
    with pytest.raises(ValueError, match="another model.*overwrite"):
        Index.build(other, photos, tmp_path / "idx", progress=False)
    with pytest.warns(UserWarning):
        rebuilt = Index.build(other, photos, tmp_path / "idx", progress=False, overwrite=True)
    assert rebuilt.search(other, photos / "img01.png", TEXT, k=3)
    (tmp_path / "someone_elses").mkdir()
    (tmp_path / "someone_elses" / "thesis.tex").write_text("...")
    with pytest.raises(FileExistsError, match="not empty"):
        Index.build(model, photos, tmp_path / "someone_elses", progress=False)
    with pytest.raises(FileNotFoundError, match="no images"):
        Index.build(model, tmp_path / "someone_elses", tmp_path / "empty_idx", progress=False)


def test_index_and_search_commands(photos, tmp_path, capsys):
    out = tmp_path / "photos.index"
    assert index_command(["--model", "coalign_tiny", "--images", str(photos), "--output", str(out),
                          "--num_workers", "0", "--progress", "false", "--device", "cpu"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "indexed 14 images" in captured.out
    assert "skipped 1 unreadable" in captured.err and "broken.jpg" in captured.err
    assert "note: coalign_tiny has no published weights" in captured.err
    picture = tmp_path / "results.png"
    args = ["--index", str(out), "--image", str(photos / "img01.png"), "--text", TEXT, "--top_k", "4"]
    assert search_command([*args, "--output", str(picture), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ranked = [line.split() for line in lines[1:5]]
    assert [r[0] for r in ranked] == ["1", "2", "3", "4"] and all(
        r[2].startswith(str(photos.resolve())) for r in ranked
    )
    assert [float(r[1]) for r in ranked] == sorted((float(r[1]) for r in ranked), reverse=True)
    assert Image.open(picture).size[0] > 4 * 128
    # another model: said so, exit code 2
    other = tmp_path / "other_model"
    _tiny(3).save_pretrained(other)
    assert search_command([*args, "--model", str(other), "--device", "cpu"]) == 2
    assert "built by another model" in capsys.readouterr().err
    assert search_command(["--index", str(tmp_path / "nowhere"), "--image", "x.png", "--text", "t", "-k", "3"]) == 2
    assert "not a coalign index" in capsys.readouterr().err
    for command in (index_command, search_command):
        assert command(["--help"]) == 0
        assert "examples:" in capsys.readouterr().out


needs_faiss = pytest.mark.skipif(index_module.load_faiss() is None, reason="faiss is not installed")


@needs_faiss
def test_an_approximate_index_is_saved_loaded_checked_and_rebuilt_when_stale(photos, tmp_path):
    model = _tiny()
    with pytest.warns(UserWarning, match="skipped"):
        index = Index.build(model, photos, tmp_path / "idx", progress=False, approximate="hnsw")
    record = json.loads((tmp_path / "idx" / "index.json").read_text())["approximate"]
    assert record["kind"] == "hnsw" and record["vectors"] == 14 and record["dim"] == 32
    assert record["params"] == {"M": 32, "efConstruction": 80, "efSearch": 128, "rerank": 4}
    saved = tmp_path / "idx" / "faiss.index"
    assert saved.is_file() and not list((tmp_path / "idx").glob(".tmp-*"))

    query = photos / "img01.png"
    with torch.no_grad():
        expected = _brute_force(model, photos, index.paths, query, 5)
    loaded = Index.load(tmp_path / "idx")
    got = loaded.search(model, query, TEXT, k=5)  # auto: the saved HNSW index (14 vectors: it finds them all)
    assert loaded._approximate_index is not None and loaded._approximate_index.ntotal == 14
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)

    # a corrupt file, or embeddings that no longer match the record: rebuilt with a warning, never used
    saved.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="stale .*cannot read the FAISS index"):
        assert [p for p, _ in Index.load(tmp_path / "idx").search(model, query, TEXT, k=5)] == [p for p, _ in got]
    assert Index.load(tmp_path / "idx")._load_approximate().ntotal == 14  # the rebuilt file loads silently
    stale = Index.load(tmp_path / "idx")
    stale.embeddings[3] = -stale.embeddings[3]
    with pytest.warns(UserWarning, match="stale .*embeddings changed"):
        stale.search(model, query, TEXT, k=5)
    shrunk = Index.load(tmp_path / "idx")
    shrunk.paths, shrunk.embeddings = shrunk.paths[:10], shrunk.embeddings[:10]
    with pytest.warns(UserWarning, match="stale .*14 vectors"):
        shrunk.search(model, query, TEXT, k=3)

    # rebuilt without --approximate: the FAISS file is removed and search is exact again
    with pytest.warns(UserWarning, match="skipped"):
        exact = Index.build(model, photos, tmp_path / "idx", progress=False)
    assert exact.approximate is None and not saved.exists()


@needs_faiss
def test_ivfpq_recall_on_clustered_vectors_and_its_limits(tmp_path):
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    rows = F.normalize(
        centers[torch.randint(64, (12_000,), generator=g)] + 0.2 * torch.randn(12_000, 32, generator=g), dim=-1
    )
    queries = F.normalize(centers[:50] + 0.2 * torch.randn(50, 32, generator=g), dim=-1)
    (tmp_path / "idx").mkdir()
    info = {"format": "coalign-index", "model": {"fingerprint": "x"}}
    index = Index(tmp_path / "idx", tmp_path, [f"{i}.png" for i in range(len(rows))], rows.unsqueeze(1), info)
    index.build_approximate("ivfpq", {"nlist": 64, "nprobe": 8, "train_size": 5000})
    expected = {"nlist": 64, "nprobe": 8, "m": 8, "bits": 8, "train_size": 5000, "rerank": 20}
    assert index.approximate["params"] == expected
    scores, found = index.search_approximate(queries, 10)
    exact = chunked_topk(queries, rows, 10)
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(found, exact.indices)) / exact.indices.numel()
    assert recall >= 0.9
    # re-scored exactly: every returned score is the true inner product
    torch.testing.assert_close(scores, (queries.unsqueeze(1) * rows[found]).sum(-1))
    with pytest.raises(ValueError, match="needs at least 39,936 vectors"):
        index.build_approximate("ivfpq", {"nlist": 1024})
    with pytest.raises(ValueError, match="must divide the embedding width 32"):
        index.build_approximate("ivfpq", {"nlist": 16, "m": 5})
    with pytest.raises(ValueError, match="approximate must be one of hnsw, ivfpq"):
        index.build_approximate("lsh")
    with pytest.raises(ValueError, match=r"unknown hnsw parameter\(s\) \['nprobe'\]"):
        index.build_approximate("hnsw", {"nprobe": 3})


@needs_faiss
def test_the_index_command_builds_an_approximate_index_that_search_uses(photos, tmp_path, capsys):
    out = tmp_path / "photos.index"
    assert index_command(["--model", "coalign_tiny", "--images", str(photos), "--output", str(out), "--num_workers",
                          "0", "--progress", "false", "--device", "cpu", "--approximate", "hnsw"]) == 0  # fmt: skip
    assert "approximate index hnsw (14 vectors)" in capsys.readouterr().out
    args = ["--index", str(out), "--image", str(photos / "img01.png"), "--text", TEXT, "-k", "3", "--device", "cpu"]
    assert search_command(args) == 0
    approximate = capsys.readouterr().out.splitlines()[1:]
    assert search_command([*args, "--backend", "torch"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == approximate  # tiny: the approximate search is exact
    assert index_command(["--model", "coalign_tiny", "--images", str(photos), "--output", str(tmp_path / "x"),
                          "--device", "cpu", "--approximate", "lsh"]) == 2  # fmt: skip
    assert "approximate" in capsys.readouterr().err
