"""Looking at a joint embedding space: nearest reports for an image, a 2-D map, and the modality gap.

The modality gap (Liang et al., "Mind the Gap", NeurIPS 2022) is the distance between the centroids of the
L2-normalized image and text embeddings; contrastive models keep the two modalities in separate cones, so a matched
image-report pair is far less similar than two images or two reports, even when retrieval works.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medvlp.tasks.retrieval import EmbeddingIndex

__all__ = ["embedding_map", "modality_gap", "nearest_reports"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_reports(
    image_emb: np.ndarray, text_emb: np.ndarray, reports: Sequence[str], query: int, k: int = 5
) -> pd.DataFrame:
    """The ``k`` reports closest to image ``query`` (cosine), with whether each is the image's own report.

    Row ``i`` of ``image_emb`` and ``text_emb`` is a true pair, as in :func:`medvlp.tasks.retrieval.retrieval_metrics`.
    """
    if not 0 <= query < len(image_emb):
        raise ValueError(f"query {query} is not an image index in [0, {len(image_emb)})")
    index = EmbeddingIndex(text_emb.shape[1])
    index.add(_unit(text_emb).astype(np.float32))
    scores, ids = index.search(_unit(image_emb[query : query + 1]).astype(np.float32), k)
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(ids[0]) + 1),
            "similarity": scores[0],
            "own report": ids[0] == query,
            "report": [" ".join(str(reports[i]).split()) for i in ids[0]],
        }
    ).set_index("rank")


def modality_gap(image_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, float]:
    """Centroid distance of the two modalities and the mean cosine similarities within and across them.

    Returns:
        ``gap`` (norm of the difference of the centroids of the unit vectors), ``matched`` (image vs its own report),
        ``unmatched`` (image vs other reports), ``image_image`` and ``text_text`` (distinct pairs).
    """
    img, txt = _unit(image_emb), _unit(text_emb)
    n = len(img)
    cross = img @ txt.T
    off = ~np.eye(n, dtype=bool)
    return {
        "gap": float(np.linalg.norm(img.mean(0) - txt.mean(0))),
        "matched": float(np.diag(cross).mean()),
        "unmatched": float(cross[off].mean()) if n > 1 else float("nan"),
        "image_image": float((img @ img.T)[off].mean()) if n > 1 else float("nan"),
        "text_text": float((txt @ txt.T)[off].mean()) if n > 1 else float("nan"),
    }


def embedding_map(
    image_emb: np.ndarray, text_emb: np.ndarray | None = None, perplexity: float = 30.0, seed: int = 0
) -> pd.DataFrame:
    """A 2-D t-SNE map (scikit-learn, cosine metric) of the image embeddings, and of the reports when given.

    Returns:
        Columns ``x, y, modality`` (``image`` or ``report``) and ``item`` (the row in its own array).
    """
    from sklearn.manifold import TSNE

    parts = [("image", _unit(image_emb))] + ([("report", _unit(text_emb))] if text_emb is not None else [])
    x = np.vstack([p for _, p in parts])
    if len(x) < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {len(x)}")
    perp = float(min(perplexity, (len(x) - 1) / 3))  # scikit-learn requires perplexity < n_samples
    z = TSNE(2, perplexity=perp, metric="cosine", init="pca", random_state=seed).fit_transform(x)
    return pd.DataFrame(
        {
            "x": z[:, 0],
            "y": z[:, 1],
            "modality": np.concatenate([[m] * len(p) for m, p in parts]),
            "item": np.concatenate([np.arange(len(p)) for _, p in parts]),
        }
    )
