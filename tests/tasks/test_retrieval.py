"""Retrieval metrics against brute force, the blocked path, label-aware precision and the embedding index."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medvlp.tasks import retrieval
from medvlp.tasks.retrieval import EmbeddingIndex, label_groups, retrieval_metrics


def _pairs(n: int = 300, e: int = 16, noise: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, e)).astype(np.float32)
    txt = (img + noise * rng.standard_normal((n, e))).astype(np.float32)
    return img, txt


def _brute(queries: np.ndarray, cands: np.ndarray, ks: tuple[int, ...], labels: np.ndarray) -> dict[str, float]:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = cands / np.linalg.norm(cands, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ c.T.astype(np.float64)
    order = np.argsort(-sim, axis=1)
    ranks = np.array([int(np.flatnonzero(order[i] == i)[0]) + 1 for i in range(len(q))])
    out = {f"R@{k}": float((ranks <= k).mean()) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(ranks.mean())
    clean = np.where(np.isin(labels, (0, 1)), labels, 0)
    for k in ks:
        hits = [sum(j == i or np.array_equal(clean[j], clean[i]) for j in order[i, :k]) / k for i in range(len(q))]
        out[f"precision@{k}"] = float(np.mean(hits))
    return out


def test_matches_brute_force() -> None:
    img, txt = _pairs()
    labels = np.random.default_rng(5).choice([0.0, 1.0, -1.0, np.nan], size=(300, 2), p=[0.5, 0.3, 0.1, 0.1])
    ks = (1, 5, 10)
    out = retrieval_metrics(img, txt, ks=ks, labels=labels, block_size=64)
    assert out["n"] == 300
    for key, (q, c) in {"image_to_report": (img, txt), "report_to_image": (txt, img)}.items():
        ref = _brute(q, c, ks, labels)
        assert ref["R@1"] < 1.0 and ref["median_rank"] > 1  # a non-trivial case
        assert ref["precision@5"] > ref["R@1"] / 5  # label matches add relevant items
        assert out[key].keys() == ref.keys()
        for name, value in ref.items():
            assert math.isclose(out[key][name], value, rel_tol=1e-9), (key, name)


def test_identical_embeddings_give_perfect_recall() -> None:
    img, _ = _pairs(100)
    out = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(img.copy()))
    for direction in ("image_to_report", "report_to_image"):
        assert out[direction]["R@1"] == 1.0 and out[direction]["median_rank"] == 1.0
        assert out[direction]["mean_rank"] == 1.0


def test_blocked_equals_unblocked() -> None:
    img, txt = _pairs(257, seed=3)
    labels = np.random.default_rng(0).integers(-1, 2, size=(257, 3)).astype(float)
    full = retrieval_metrics(img, txt, labels=labels, block_size=10_000)
    blocked = retrieval_metrics(img, txt, labels=labels, block_size=7)
    tiny = retrieval_metrics(img, txt, labels=labels, max_block_elements=1000)  # 3 rows per block
    for other in (blocked, tiny):
        for direction in ("image_to_report", "report_to_image"):
            assert other[direction].keys() == full[direction].keys()
            for name, value in full[direction].items():
                assert math.isclose(other[direction][name], value, rel_tol=1e-12), (direction, name)


def test_block_rows_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = retrieval._scan

    def spy(img, txt, ks, groups, answers, rows):  # type: ignore[no-untyped-def]
        seen.append(rows)
        return original(img, txt, ks, groups, answers, rows)

    monkeypatch.setattr(retrieval, "_scan", spy)
    img, txt = _pairs(500)
    retrieval_metrics(img, txt, block_size=4096, max_block_elements=500 * 64)
    retrieval_metrics(img, txt, block_size=16)
    assert seen == [64, 16]


def test_label_aware_precision_hand_example() -> None:
    # image i is the basis vector e_i, so sim(image i, text j) = S[i, j] with text_emb = S.T
    s = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8], [0.7, 0.1, 0.4]])
    labels = np.array([[1, 0], [1, np.nan], [-1, 1]])  # rows 0 and 1 equal once NaN/-1 count as 0
    assert list(label_groups(labels)) == [1, 1, 0]
    out = retrieval_metrics(np.eye(3), s.T, ks=(1, 2), labels=labels, normalize=False)
    i2r, r2i = out["image_to_report"], out["report_to_image"]
    assert math.isclose(i2r["precision@1"], 1 / 3) and math.isclose(i2r["precision@2"], 2 / 3)
    assert math.isclose(r2i["precision@1"], 2 / 3) and math.isclose(r2i["precision@2"], 2 / 3)
    assert math.isclose(i2r["R@1"], 1 / 3) and i2r["median_rank"] == 2.0
    assert math.isclose(r2i["R@1"], 1 / 3) and math.isclose(r2i["mean_rank"], 5 / 3)


def _ref_topk(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ db.T.astype(np.float64)), axis=1)[:, :k]


def test_index_torch_fallback_exact() -> None:
    rng = np.random.default_rng(1)
    db, q = rng.standard_normal((1000, 24)).astype(np.float32), rng.standard_normal((37, 24)).astype(np.float32)
    index = EmbeddingIndex(24, use_faiss=False, query_block=10, db_block=128)
    index.add(db[:600])
    index.add(db[600:])
    scores, ids = index.search(q, 10)
    assert ids.shape == scores.shape == (37, 10)
    np.testing.assert_array_equal(ids, _ref_topk(db, q, 10))
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores[:, 0], (q @ db.T).max(1), rtol=1e-5)
    _, all_ids = index.search(q[:2], 5000)  # k larger than the index
    assert all_ids.shape == (2, 1000)


def test_index_faiss_matches_fallback() -> None:  # faiss-cpu is a dependency: no skip when it is missing
    rng = np.random.default_rng(2)
    db, q = rng.standard_normal((2000, 32)).astype(np.float32), rng.standard_normal((50, 32)).astype(np.float32)
    names = [f"study-{i}" for i in range(2000)]
    a, b = EmbeddingIndex(32, use_faiss=True), EmbeddingIndex(32, use_faiss=False, db_block=300)
    for index in (a, b):
        index.add(torch.from_numpy(db), names)
    sa, ia = a.search(q, 10)
    sb, ib = b.search(q, 10)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-5)
    assert ia[0, 0] == names[int(_ref_topk(db, q, 1)[0, 0])]


@pytest.mark.parametrize("use_faiss", [False, None])
def test_index_save_load_round_trip(tmp_path, use_faiss: bool | None) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    db = rng.standard_normal((120, 8)).astype(np.float32)
    index = EmbeddingIndex(8, use_faiss=use_faiss)
    index.add(db, ids=list(range(100, 220)))
    folder = index.save(tmp_path / "idx")
    assert (folder / "vectors.npy").is_file() and (folder / "index.json").is_file()
    loaded = EmbeddingIndex.load(folder, use_faiss=False)
    assert len(loaded) == 120 and loaded.dim == 8 and loaded.ids == list(range(100, 220))
    np.testing.assert_array_equal(loaded.vectors, db)
    (sa, ia), (sb, ib) = index.search(db[:5], 3), loaded.search(db[:5], 3)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=1e-5)
    empty = EmbeddingIndex.load(EmbeddingIndex(4).save(tmp_path / "empty"))
    assert len(empty) == 0 and empty.search(np.zeros((2, 4)), 3)[1].shape == (2, 0)


def test_index_requires_faiss_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "HAVE_FAISS", False)
    with pytest.raises(ImportError):
        EmbeddingIndex(4, use_faiss=True)
    assert EmbeddingIndex(4).use_faiss is False


def test_a_collapsed_model_scores_no_better_than_chance() -> None:
    same = np.ones((50, 8), dtype=np.float32)  # every image and report embedded at one point: all ties
    out = retrieval_metrics(same, same.copy())
    for direction in ("image_to_report", "report_to_image"):
        assert out[direction]["R@1"] == 0.0 and out[direction]["R@10"] == 0.0  # ties count against the model
        assert out[direction]["median_rank"] == 50.0


def test_identical_reports_are_one_answer() -> None:
    from medvlp.tasks.retrieval import answer_groups, normalize_report

    texts = ["No acute abnormality.", "no acute  abnormality", "Small left effusion.", "Right pneumothorax."]
    assert normalize_report(texts[0]) == normalize_report(texts[1])
    g = answer_groups(texts, 4)
    assert g[0] == g[1] and len(set(g)) == 3
    img = np.eye(4, dtype=np.float32)
    txt = np.eye(4, dtype=np.float32)
    txt[0], txt[1] = img[1], img[0]  # the two normal reports swapped: each image's best report is the other one
    plain = retrieval_metrics(img, txt, ks=(1,))
    grouped = retrieval_metrics(img, txt, ks=(1,), texts=texts)
    assert plain["image_to_report"]["R@1"] == 0.5 and grouped["image_to_report"]["R@1"] == 1.0
    assert plain["report_to_image"]["R@1"] == 0.5 and grouped["report_to_image"]["R@1"] == 1.0
    assert grouped["answers"] == 3
    with pytest.raises(ValueError, match="report texts"):
        retrieval_metrics(img, txt, texts=texts[:3])
