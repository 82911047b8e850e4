"""Section 4 as code: MHA, MQA and GQA are non-contextual TPA.  This module owns the conversion
of a standard-attention model (config + params) into the non-contextual-A TPA model that computes
exactly the same function:

* queries: R_Q = h, a^Q_i = h e_i (non-contextual), b^Q_i(x) = (W^Q_i)^T x;
* keys/values with K kv heads (MHA: K = h, MQA: K = 1): R_K = R_V = K, a^K_j = K mask_j where
  mask_j marks the G = h / K query heads of kv head j, b^K_j(x) = (W^K_j)^T x (same for V).

The 1/R scale of eq. 3.1 cancels the factor h (or K) in a, so the result is exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ..config import ModelConfig


def head_factors(n_head: int, n_groups: int) -> np.ndarray:
    """[K, H] non-contextual head factors for K = ``n_groups`` kv heads: row j is K * mask_j, the
    mask of query heads j*H/K .. (j+1)*H/K - 1."""
    kv_head_H = np.arange(n_head) // (n_head // n_groups)
    return n_groups * (kv_head_H[None, :] == np.arange(n_groups)[:, None]).astype(np.float32)


def noncontextual_tpa_from_standard(cfg: ModelConfig, params: dict[str, Any],
                                    ) -> tuple[ModelConfig, dict[str, Any]]:
    """(TPA config, TPA params) reproducing an MHA / MQA / GQA model (paper Section 4.1-4.2)."""
    if cfg.attention not in ("mha", "mqa", "gqa"):
        raise ValueError(f"cfg.attention: expected 'mha', 'mqa' or 'gqa', got {cfg.attention!r}")
    h, kv = cfg.n_head, cfg.kv_heads
    tpa_cfg = dataclasses.replace(cfg, attention="tpa", n_kv_head=None, q_rank=h, k_rank=kv, v_rank=kv,
                                  contextual_a=False)
    attn = params["blocks"]["attn"]
    n_layer = cfg.n_layer

    def stacked(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a, (n_layer,) + a.shape).astype(np.asarray(attn["w_q"]).dtype)

    new_attn = {
        "a_q": stacked(head_factors(h, h)),
        "w_bq": attn["w_q"],  # [L, M, H, D] read as [L, M, P, D]: rank index = head index
        "a_k": stacked(head_factors(h, kv)),
        "w_bk": attn["w_k"],  # [L, M, K, D] read as [L, M, R, D]: rank index = kv head
        "a_v": stacked(head_factors(h, kv)),
        "w_bv": attn["w_v"],
        "w_o": attn["w_o"],
    }
    if "out_norm" in attn:
        new_attn["out_norm"] = attn["out_norm"]
    blocks = dict(params["blocks"])
    blocks["attn"] = jax.tree_util.tree_map(np.asarray, new_attn)
    out = dict(params)
    out["blocks"] = blocks
    return tpa_cfg, out
