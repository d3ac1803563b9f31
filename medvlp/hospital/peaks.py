"""Where each finding's grounding map peaks, in the voxels of the stored image (for an SR's spatial coordinates)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from medvlp.tasks.grounding import similarity_map

__all__ = ["grounding_peaks"]


def grounding_peaks(
    tokens: Tensor, grid: Sequence[int], positive: Tensor, size: Sequence[int], source_to_output: np.ndarray
) -> list[list[float]]:
    """The peak of each finding's similarity map (:func:`medvlp.tasks.grounding.similarity_map`), mapped back to
    the stored image.

    Args:
        tokens: ``[N, E]`` patch tokens of one image.
        grid: the token grid.
        positive: ``[F, E]`` positive prompt embeddings, one per finding.
        size: the model's input size ``(X, Y[, Z])``.
        source_to_output: 4x4 stored-image voxel -> model-input voxel (``Preprocessed.source_to_output``).

    Returns:
        Per finding, the peak as a stored-image voxel position ``[i, j(, k)]`` (voxel centres at integers; ``i``
        runs along a DICOM row, ``j`` down the rows), as floats.
    """
    n = positive.shape[0]
    maps = similarity_map(tokens.expand(n, *tokens.shape), grid, positive, size).numpy()  # [F, *size]
    dims = len(size)
    back = np.linalg.inv(source_to_output)
    out = []
    for m in maps:
        idx = np.unravel_index(int(np.nanargmax(m)), m.shape)
        homo = np.zeros(4)
        homo[:dims] = idx
        homo[3] = 1.0
        out.append([round(float(v), 3) for v in (back @ homo)[:dims]])
    return out
