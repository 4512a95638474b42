"""The sampling a sample head must reproduce, written the plain way (shared by the onnxruntime and cmodel tests)."""

from __future__ import annotations

import numpy as np

K = 50  # candidates a sample head returns


def sample_reference(logits, input_ids, penalty, temperature, top_k, top_p, k=K):
    """The plain way, as transformers' processors do it: (probs [1,K], token_idx [1,K])."""
    x = np.asarray(logits, dtype=np.float64)[0].copy()
    seen = np.unique(np.asarray(input_ids).reshape(-1))
    x[seen] = np.where(x[seen] < 0, x[seen] * penalty, x[seen] / penalty)  # repetition penalty
    x = x / temperature  # temperature
    order = np.argsort(-x, kind="stable")
    keep_k = min(max(int(top_k), 1), k)
    p = np.exp(x[order[:keep_k]] - x[order[0]])  # top-k, then their softmax
    p /= p.sum()
    before = np.cumsum(p) - p  # top-p: keep while the mass before is below top_p; the best always stays
    p = np.where((before < top_p) | (np.arange(keep_k) == 0), p, 0.0)
    probs = np.zeros(k)
    probs[:keep_k] = p / p.sum()
    return probs[None], order[:k][None]
