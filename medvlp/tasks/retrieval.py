"""Image <-> report retrieval metrics in bounded memory, and an exact inner-product embedding index.

:func:`retrieval_metrics` never holds the ``N x N`` similarity matrix ``S = images @ reports.T``: it computes a
block of image rows against all reports at a time (at most ``max_block_elements`` similarities), twice: the first
pass finds each report's true-pair score down the columns, the second ranks both directions (ties against the model,
identical reports as one answer) and keeps the label-aware top-K lists (a row top-k and a running column top-k).

:class:`EmbeddingIndex` uses faiss ``IndexFlatIP`` when faiss is installed and otherwise an exact torch
block-wise top-k; both return the same neighbours (up to ties).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional accelerator; everything works without it
    import faiss  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

__all__ = ["HAVE_FAISS", "EmbeddingIndex", "answer_groups", "label_groups", "normalize_report", "retrieval_metrics"]

HAVE_FAISS = faiss is not None
INDEX_FORMAT = "medvlp-index/1"
MAX_BLOCK_ELEMENTS = 2**24  # similarities held at once (64 MiB in float32)


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().float().cpu()


def label_groups(labels: np.ndarray) -> np.ndarray:
    """Group id per row of a ``[N, F]`` label matrix; -1 and NaN count as 0, so equal groups mean equal labels."""
    lab = np.nan_to_num(np.asarray(labels, dtype=np.float64).reshape(len(labels), -1), nan=0.0)
    lab[lab == -1] = 0.0
    _, inverse = np.unique(lab, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def _merge_column_topk(sim: Tensor, start: int, vals: Tensor, idx: Tensor, buf: Tensor) -> None:
    """Fold a block's rows into the running per-column top-k (``vals``/``idx`` ``[k, N]``, descending).

    Until every column holds k entries the block is merged densely (a top-k down each column); after that, only
    the entries beating their column's k-th value are gathered, and each touched column's old top-k plus its new
    entries are sorted (by column, then value) and cut back to k. Equal similarities may come in either order.
    """
    k = vals.shape[0]
    if not torch.isfinite(vals[-1]).all():
        block_v, block_pos = sim.topk(min(k, sim.shape[0]), dim=0)  # [k', N]
        top_v, top_pos = torch.cat([vals, block_v]).topk(k, dim=0)  # [k, N]
        idx.copy_(torch.cat([idx, block_pos + start]).gather(0, top_pos))
        vals.copy_(top_v)
        return
    r, c = torch.sub(sim, vals[-1][None, :], out=buf).gt_(0).nonzero(as_tuple=True)  # [M] candidates
    if c.numel() == 0:
        return
    ucols = c.unique()  # [U]
    all_v = torch.cat([vals[:, ucols].T.reshape(-1), sim[r, c]])  # old top-k of the touched columns first
    all_i = torch.cat([idx[:, ucols].T.reshape(-1), r + start])
    all_c = torch.cat([ucols.repeat_interleave(k), c])
    order = torch.argsort(all_v, descending=True, stable=True)
    order = order[torch.argsort(all_c[order], stable=True)]  # by column, then value descending
    all_v, all_i, all_c = all_v[order], all_i[order], all_c[order]
    _, counts = torch.unique_consecutive(all_c, return_counts=True)
    pos = torch.arange(len(all_c)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    keep = pos < k
    vals[pos[keep], all_c[keep]] = all_v[keep]
    idx[pos[keep], all_c[keep]] = all_i[keep]


def _summary(ranks: Tensor, ks: Sequence[int], top: Tensor | None, groups: Tensor | None) -> dict[str, float]:
    """R@K, median/mean rank and, with ``top [N, kmax]`` retrieved indices and label groups, precision@K."""
    r = ranks.double()
    out = {f"R@{k}": float((r <= k).double().mean()) for k in ks}
    out["median_rank"] = float(np.median(r.numpy()))
    out["mean_rank"] = float(r.mean())
    if top is not None and groups is not None:
        query = torch.arange(len(top))[:, None]
        relevant = groups[top] == groups[query]  # [N, kmax]; the true pair shares the query's row, so it counts
        cum = relevant.cumsum(dim=1).double()
        out.update({f"precision@{k}": float((cum[:, min(k, top.shape[1]) - 1] / k).mean()) for k in ks})
    return out


def normalize_report(text: str) -> str:
    """The form in which two reports count as the same answer: lower case, single spaces, no final full stop."""
    return " ".join(str(text).lower().split()).rstrip(". ")


def answer_groups(texts: Sequence[str] | None, n: int) -> np.ndarray:
    """Answer group per pair: pairs whose reports are identical once normalized (:func:`normalize_report`) share
    one; without texts every pair is its own answer."""
    if texts is None:
        return np.arange(n)
    if len(texts) != n:
        raise ValueError(f"{len(texts)} report texts for {n} pairs")
    _, inverse = np.unique(np.array([normalize_report(t) for t in texts], dtype=object), return_inverse=True)
    return inverse.reshape(-1)


def _scan(
    img: Tensor, txt: Tensor, ks: Sequence[int], groups: Tensor | None, answers: Tensor, rows_per_block: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Two blocked passes over ``S = img @ txt.T``: rows give image -> report, columns report -> image.

    Pairs sharing an answer group (identical reports) are one answer, and ties count against the model: image ->
    report ranks the groups by their best report, ``1 + #(other groups scoring >= the true group)``; report ->
    image ranks images, ``1 + #(images of other groups scoring >= the best image of the query's group)``. A
    collapsed model (all similarities equal) therefore ranks last, not first.
    """
    n = img.shape[0]
    n_groups = int(answers.max()) + 1 if n else 0
    kmax = min(max(ks), n)
    col_true = torch.full((n,), float("-inf"))  # [N] best similarity of report j with an image of its group
    for start in range(0, n, rows_per_block):  # pass 1: the column side's true-pair scores
        stop = min(start + rows_per_block, n)
        sim = img[start:stop] @ txt.T  # [b, N]
        same = answers[start:stop, None] == answers[None, :]  # [b, N]
        col_true = torch.maximum(col_true, sim.masked_fill(~same, float("-inf")).amax(dim=0))
    row_rank = torch.empty(n, dtype=torch.long)
    col_beaten = torch.zeros(n, dtype=torch.long)
    row_top = torch.empty(n, kmax, dtype=torch.long) if groups is not None else None
    col_val = torch.full((kmax, n), float("-inf")) if groups is not None else None
    col_idx = torch.zeros((kmax, n), dtype=torch.long) if groups is not None else None
    buf = torch.empty(min(rows_per_block, n), n)  # [b, N] scratch
    for start in range(0, n, rows_per_block):  # pass 2: ranks, same blocks, same numbers
        stop = min(start + rows_per_block, n)
        sim = img[start:stop] @ txt.T  # [b, N]
        b, own = stop - start, answers[start:stop]
        best = torch.full((b, n_groups), float("-inf")).scatter_reduce_(
            1, answers.expand(b, n), sim, reduce="amax"
        )  # [b, G] best report of each group
        true = best.gather(1, own[:, None])  # [b, 1]
        best.scatter_(1, own[:, None], float("-inf"))
        row_rank[start:stop] = (best >= true).sum(dim=1) + 1
        same = own[:, None] == answers[None, :]  # [b, N]
        col_beaten += ((sim >= col_true[None, :]) & ~same).sum(dim=0)
        if row_top is not None:
            row_top[start:stop] = sim.topk(kmax, dim=1).indices
            _merge_column_topk(sim, start, col_val, col_idx, buf[:b])
        del sim, best, same
    col_top = col_idx.T.contiguous() if col_idx is not None else None
    return _summary(row_rank, ks, row_top, groups), _summary(col_beaten + 1, ks, col_top, groups)


@torch.no_grad()
def retrieval_metrics(
    image_emb: Tensor | np.ndarray,
    text_emb: Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    labels: np.ndarray | None = None,
    texts: Sequence[str] | None = None,
    block_size: int = 4096,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
    normalize: bool = True,
) -> dict[str, Any]:
    """Recall@K, median/mean rank and label-aware precision@K for image -> report and report -> image retrieval.

    Row ``i`` of ``image_emb`` and ``text_emb`` is a true pair. Ties count against the model, and with ``texts``
    identical reports (after :func:`normalize_report`) form one answer: retrieving any of them is a hit, and they
    are ranked as one candidate (see :func:`_scan`).

    Args:
        image_emb: ``[N, E]``.
        text_emb: ``[N, E]``.
        ks: the K of R@K and precision@K.
        labels: optional ``[N, F]`` finding labels (1/0/-1/NaN). A retrieved item is relevant for precision@K when
            its label vector equals the query's (-1 and NaN treated as 0), which includes the true pair;
            precision@K is the mean over queries of ``#relevant in the top K / K``.
        texts: the ``N`` report texts, to group identical reports; None treats every report as distinct.
        block_size: most image rows per similarity block.
        max_block_elements: most similarities held at once; blocks shrink to ``max_block_elements // N`` rows.
        normalize: L2-normalize the embeddings first (cosine similarity).

    Returns:
        ``{"n": N, "answers": distinct answers, "image_to_report": {...}, "report_to_image": {...}}`` with ``R@K``,
        ``median_rank``, ``mean_rank`` and, with labels, ``precision@K``.
    """
    img, txt = _as_tensor(image_emb), _as_tensor(text_emb)  # [N, E]
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"image_emb {tuple(img.shape)} and text_emb {tuple(txt.shape)} must both be [N, E]")
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    n = img.shape[0]
    groups = None
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"labels have {len(labels)} rows for {n} pairs")
        groups = torch.from_numpy(label_groups(labels))
    answers = torch.from_numpy(answer_groups(texts, n)).long()
    rows = max(1, min(block_size, max_block_elements // max(n, 1)))
    image_to_report, report_to_image = _scan(img, txt, ks, groups, answers, rows)
    return {
        "n": n,
        "answers": int(answers.max()) + 1 if n else 0,
        "image_to_report": image_to_report,
        "report_to_image": report_to_image,
    }


class EmbeddingIndex:
    """Exact inner-product search: faiss ``IndexFlatIP`` when available, else torch top-k in blocks.

    Args:
        dim: embedding size.
        use_faiss: None uses faiss when it is installed; True requires it; False uses torch.
        query_block: queries per torch block.
        db_block: database rows per torch block.
    """

    def __init__(self, dim: int, use_faiss: bool | None = None, query_block: int = 1024, db_block: int = 65536) -> None:
        if use_faiss and not HAVE_FAISS:
            raise ImportError("use_faiss=True but faiss is not installed (pip install faiss-cpu)")
        self.dim = int(dim)
        self.use_faiss = HAVE_FAISS if use_faiss is None else bool(use_faiss)
        self.query_block, self.db_block = query_block, db_block
        self._faiss = faiss.IndexFlatIP(self.dim) if self.use_faiss else None
        self._chunks: list[np.ndarray] = []  # torch path: added blocks, concatenated lazily
        self._ids: list[Any] = []
        self._id_array: np.ndarray | None = None  # cached np.asarray(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[Any]:
        return list(self._ids)

    @property
    def vectors(self) -> np.ndarray:
        """``[M, dim]`` float32, in insertion order."""
        if self._faiss is not None:
            return self._faiss.reconstruct_n(0, self._faiss.ntotal) if len(self) else np.zeros((0, self.dim), "f4")
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.dim), "f4")]
        return self._chunks[0]

    def add(self, emb: Tensor | np.ndarray, ids: Sequence[Any] | None = None) -> None:
        """Add ``[M, dim]`` vectors with their ids (ints or strings; default: running positions)."""
        arr = np.ascontiguousarray(_as_tensor(emb).numpy(), dtype=np.float32).reshape(-1, self.dim)
        if ids is None:
            ids = range(len(self), len(self) + len(arr))
        ids = [i.item() if isinstance(i, np.generic) else i for i in ids]
        if len(ids) != len(arr):
            raise ValueError(f"{len(ids)} ids for {len(arr)} vectors")
        if self._faiss is not None:
            self._faiss.add(arr)
        else:
            self._chunks.append(arr)
        self._ids.extend(ids)
        self._id_array = None

    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` highest inner products per query.

        Returns:
            ``scores [Q, k]`` float32 (descending) and ``ids [Q, k]`` (the ids given to :meth:`add`).
        """
        q = np.ascontiguousarray(_as_tensor(queries).numpy(), dtype=np.float32).reshape(-1, self.dim)
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(q), 0), "f4"), np.zeros((len(q), 0), dtype=np.int64)
        if self._faiss is not None:
            scores, pos = self._faiss.search(q, k)
        else:
            scores, pos = self._torch_search(torch.from_numpy(q), k)
        if self._id_array is None:
            self._id_array = np.asarray(self._ids)
        return scores, self._id_array[pos]

    @torch.no_grad()
    def _torch_search(self, q: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        db = torch.from_numpy(self.vectors)  # [M, dim]
        scores = np.empty((len(q), k), dtype=np.float32)
        pos = np.empty((len(q), k), dtype=np.int64)
        for qs in range(0, len(q), self.query_block):
            qb = q[qs : qs + self.query_block]  # [b, dim]
            best_s = torch.full((len(qb), 0), float("-inf"))
            best_i = torch.zeros((len(qb), 0), dtype=torch.long)
            for ds in range(0, len(db), self.db_block):
                sim = qb @ db[ds : ds + self.db_block].T  # [b, m]
                s, i = sim.topk(min(k, sim.shape[1]), dim=1)
                cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + ds], 1)
                best_s, order = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
                best_i = cand_i.gather(1, order)
            scores[qs : qs + len(qb)] = best_s.numpy()
            pos[qs : qs + len(qb)] = best_i.numpy()
        return scores, pos

    def save(self, folder: str | Path) -> Path:
        """Write ``vectors.npy`` and ``index.json`` (format, dim, ids) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "vectors.npy", self.vectors)
        meta = {"format": INDEX_FORMAT, "dim": self.dim, "count": len(self), "ids": self._ids}
        (folder / "index.json").write_text(json.dumps(meta))
        return folder

    @classmethod
    def load(cls, folder: str | Path, use_faiss: bool | None = None) -> EmbeddingIndex:
        """Read a folder written by :meth:`save`."""
        folder = Path(folder)
        meta = json.loads((folder / "index.json").read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{folder} is not a {INDEX_FORMAT} index (format {meta.get('format')!r})")
        index = cls(int(meta["dim"]), use_faiss=use_faiss)
        vectors = np.load(folder / "vectors.npy")
        if len(vectors) != len(meta["ids"]):
            raise ValueError(f"{folder}: {len(vectors)} vectors but {len(meta['ids'])} ids")
        if len(vectors):
            index.add(vectors, meta["ids"])
        return index
