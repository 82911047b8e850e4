"""Section 4 as code: MHA, MQA and GQA are non-contextual TPA.

Given a standard-attention model (config + params), build the non-contextual-A TPA model that
computes exactly the same function:

* queries: R_Q = h, a^Q_i = h e_i (non-contextual), b^Q_i(x) = (W^Q_i)^T x;
* keys/values with G kv heads (MHA: G = h, MQA: G = 1): R_K = R_V = G, a^K_j = G mask_j where
  mask_j marks the heads of group j, b^K_j(x) = (W^K_j)^T x (same for V).

The 1/R scale of eq. 3.1 cancels the factor h (or G) in a, so the result is exact.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..config import ModelConfig


def head_factors(n_head: int, n_groups: int) -> np.ndarray:
    """[G, h] non-contextual head factors: row j is G * mask_j (heads j*h/G .. (j+1)*h/G - 1)."""
    group = np.arange(n_head) // (n_head // n_groups)
    return n_groups * (group[None, :] == np.arange(n_groups)[:, None]).astype(np.float32)


def noncontextual_tpa_from_standard(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """(TPA config, TPA params) reproducing an MHA / MQA / GQA model (paper Section 4.1-4.2)."""
    if cfg.attention not in ("mha", "mqa", "gqa"):
        raise ValueError(f"cfg.attention: expected 'mha', 'mqa' or 'gqa', got {cfg.attention!r}")
    h, g = cfg.n_head, cfg.kv_heads
    tpa_cfg = dataclasses.replace(cfg, attention="tpa", n_kv_head=None, q_rank=h, k_rank=g, v_rank=g,
                                  contextual_a=False)
    attn = params["blocks"]["attn"]
    n_layer = cfg.n_layer

    def stacked(a):
        return np.broadcast_to(a, (n_layer,) + a.shape).astype(np.asarray(attn["w_q"]).dtype)

    new_attn = {
        "a_q": stacked(head_factors(h, h)),
        "w_bq": attn["w_q"],  # [L, M, H, D]: rank index r = head index i
        "a_k": stacked(head_factors(h, g)),
        "w_bk": attn["w_k"],  # [L, M, G, D]: rank index r = kv group j
        "a_v": stacked(head_factors(h, g)),
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
