"""KV-cache memory report: per-token cache size of every mechanism and the longest context that fits.

Pure functions behind ``python eval.py kv-report``:

* :func:`kv_report` -- one row (a plain dict, JSON-ready) per config;
* :func:`format_table` -- the rows as an aligned text table;
* :func:`plot` -- cache bytes vs context length (log-log) as a PNG, Agg backend.

Definitions used throughout:

* **numbers per token per layer** = :func:`tpa_jax.accounting.kv_cache_per_token` (paper Table 1's
  "KV CACHE" column: MHA ``2 h d_h``, MQA ``2 d_h``, GQA ``2 G d_h``, MLA ``d_c + d^R_h``, TPA and
  TPA-KVonly ``(R_K + R_V)(h + d_h)``).
* **bytes per token** (whole model) = numbers per token per layer x ``n_layer`` x ``dtype_bytes``
  (bf16 = 2).
* **GB means GiB**: a budget of ``memory_gb`` is ``memory_gb * 2**30`` bytes (not ``1e9``).
* **max context** = ``floor(memory_gb * 2**30 / bytes_per_token)`` tokens for one sequence (batch 1),
  and ``floor(memory_gb * 2**30 / (batch * bytes_per_token))`` tokens per sequence for a batch.  Only
  the KV cache counts (no weights, activations or allocator overhead) and the model's own
  ``max_seq_len`` is ignored: this is the cache's limit, not the model's.  Computed exactly (rational
  arithmetic), so fractional budgets such as 0.5 GiB are not rounded.
* **ratio** = bytes per token / the bytes per token of an MHA of the same size, i.e. an MHA config in
  the same report with the same ``n_layer`` and ``d_model`` (the paper's families share both).  When
  the report holds no such MHA, the baseline is the "MHA equivalent" ``2 h d_h`` (x ``n_layer`` x
  ``dtype_bytes``) of the *first* config of that size in the report, with that config's ``h`` and
  ``d_h``.  Each row names its baseline in ``ratio_baseline``.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .. import configs as named_configs
from ..accounting import kv_cache_per_token, model_params
from ..config import ModelConfig

__all__ = ["GIB", "kv_report", "format_table", "plot", "max_context", "cache_formula"]

GIB = 2 ** 30  # bytes in one "GB" of the report (GiB)

ConfigLike = Union[str, ModelConfig, tuple]


def max_context(memory_gb: float, bytes_per_token: int, batch: int = 1) -> int:
    """Longest context (tokens per sequence) whose cache fits: ``floor(GB * 2**30 / (batch * bytes))``."""
    if bytes_per_token <= 0 or batch <= 0:
        raise ValueError(f"bytes_per_token and batch must be > 0, got {bytes_per_token!r}, {batch!r}")
    return math.floor(Fraction(memory_gb) * GIB / (batch * bytes_per_token))


def cache_formula(cfg: ModelConfig) -> str:
    """Table 1's KV-cache formula of ``cfg`` with its numbers, e.g. ``(R_K+R_V)(h+d_h) = (2+2)(34+64)``."""
    a, h, d = cfg.attention, cfg.n_head, cfg.head_dim
    if a == "mha":
        return f"2*h*d_h = 2*{h}*{d}"
    if a == "mqa":
        return f"2*d_h = 2*{d}"
    if a == "gqa":
        return f"2*G*d_h = 2*{cfg.kv_heads}*{d}"
    if a == "mla":
        return f"d_c+d^R_h = {cfg.kv_lora_rank}+{cfg.rope_head_dim}"
    if cfg.contextual_a and cfg.contextual_b and not cfg.shared_kv_b and cfg.tpa_order == 2:
        return f"(R_K+R_V)(h+d_h) = ({cfg.k_rank}+{cfg.v_rank})({h}+{d})"
    return "TPA variant (see accounting.kv_cache_per_token)"


def _ranks(cfg: ModelConfig) -> Optional[dict]:
    if cfg.attention == "tpa":
        return {"q": cfg.q_rank, "k": cfg.k_rank, "v": cfg.v_rank}
    if cfg.attention == "tpa_kvonly":
        return {"k": cfg.k_rank, "v": cfg.v_rank}
    return None


def _default_name(cfg: ModelConfig) -> str:
    return f"{cfg.attention}-L{cfg.n_layer}-d{cfg.d_model}-h{cfg.n_head}"


def _named(configs: Union[Mapping[str, ModelConfig], Iterable[ConfigLike]]) -> list[tuple[str, ModelConfig]]:
    """(name, config) pairs from a mapping, names, ModelConfigs or (name, ModelConfig) pairs."""
    if isinstance(configs, Mapping):
        items: Iterable = configs.items()
    else:
        items = configs
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, named_configs.get(item)))
        elif isinstance(item, ModelConfig):
            out.append((_default_name(item), item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], ModelConfig):
            out.append((str(item[0]), item[1]))
        else:
            raise ValueError(f"kv_report: expected a config name, ModelConfig or (name, ModelConfig), got {item!r}")
    if not out:
        raise ValueError("kv_report: no configs given")
    return out


def kv_report(configs, memory_gb: float = 80.0, dtype_bytes: int = 2,
              batch: Optional[int] = None) -> list[dict]:
    """One row per config (see the module docstring for every definition).

    ``configs``: a mapping name -> ModelConfig, or a sequence of config names (``tpa_jax.configs``),
    ModelConfigs, or (name, ModelConfig) pairs.  ``memory_gb`` is in GiB (``* 2**30`` bytes).
    ``batch``: also report ``max_context_batch`` (tokens per sequence for that many sequences).

    Each row: name, attention, n_layer, d_model, n_head, head_dim, n_kv_head (distinct KV heads),
    ranks (TPA: {"q","k","v"}; KVonly: {"k","v"}; others None), params (whole model),
    kv_formula, kv_per_token_per_layer, bytes_per_token, ratio_to_mha, ratio_baseline,
    baseline_bytes_per_token, max_context and, with ``batch``, batch and max_context_batch.
    """
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not memory_gb > 0:
        raise ValueError(f"memory_gb: expected a number > 0, got {memory_gb!r}")
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, int) or dtype_bytes < 1:
        raise ValueError(f"dtype_bytes: expected an integer >= 1, got {dtype_bytes!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch: expected an integer >= 1, got {batch!r}")
    pairs = _named(configs)

    # ratio baselines, per size (n_layer, d_model): an MHA of that size, else the first config's 2 h d_h
    baselines: dict[tuple, tuple[str, int]] = {}
    for name, cfg in pairs:
        if cfg.attention == "mha":
            baselines.setdefault((cfg.n_layer, cfg.d_model), (name, kv_cache_per_token(cfg)))
    for name, cfg in pairs:
        key = (cfg.n_layer, cfg.d_model)
        if key not in baselines:
            baselines[key] = (f"2*h*d_h of {name} (h={cfg.n_head}, d_h={cfg.head_dim}; no MHA of this size)",
                              2 * cfg.n_head * cfg.head_dim)

    rows = []
    for name, cfg in pairs:
        per_layer = kv_cache_per_token(cfg)
        bpt = per_layer * cfg.n_layer * dtype_bytes
        base_name, base_per_layer = baselines[(cfg.n_layer, cfg.d_model)]
        base_bpt = base_per_layer * cfg.n_layer * dtype_bytes
        row: dict[str, Any] = dict(
            name=name, attention=cfg.attention, n_layer=cfg.n_layer, d_model=cfg.d_model,
            n_head=cfg.n_head, head_dim=cfg.head_dim, n_kv_head=cfg.kv_heads, ranks=_ranks(cfg),
            params=model_params(cfg), kv_formula=cache_formula(cfg),
            kv_per_token_per_layer=per_layer, bytes_per_token=bpt,
            ratio_to_mha=bpt / base_bpt, ratio_baseline=base_name, baseline_bytes_per_token=base_bpt,
            memory_gb=memory_gb, dtype_bytes=dtype_bytes,
            max_context=max_context(memory_gb, bpt),
        )
        if batch is not None:
            row["batch"] = batch
            row["max_context_batch"] = max_context(memory_gb, bpt, batch)
        rows.append(row)
    return rows


def _ranks_text(ranks: Optional[dict]) -> str:
    if not ranks:
        return "-"
    return "/".join(f"{k.upper()}{v}" for k, v in ranks.items())


def _fmt_bytes(n: float, digits: int = 1) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{n:.0f} B"


def _fmt_count(n: float) -> str:
    for unit, size in (("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def format_table(rows: Sequence[dict]) -> str:
    """Rows as an aligned text table (numbers right-aligned), plus a line naming each ratio baseline."""
    if not rows:
        return "(no configs)"
    gb = rows[0]["memory_gb"]
    gb_text = f"{gb:g}"
    has_batch = any("max_context_batch" in r for r in rows)
    headers = ["config", "attention", "L", "h", "d_h", "ranks", "params", "KV/token/layer", "bytes/token",
               "vs MHA", f"max ctx @{gb_text}GiB"]
    if has_batch:
        headers.append(f"max ctx x{rows[0]['batch']} seqs")
    baselines = list(dict.fromkeys(r["ratio_baseline"] for r in rows))
    marked = len(baselines) > 1 or any(_is_proxy(r) for r in rows)
    body = []
    for r in rows:
        mark = f"[{baselines.index(r['ratio_baseline']) + 1}]" if marked else ""
        line = [r["name"], r["attention"], str(r["n_layer"]), str(r["n_head"]), str(r["head_dim"]),
                _ranks_text(r["ranks"]), f"{r['params'] / 1e6:.1f}M", f"{r['kv_per_token_per_layer']:,}",
                f"{r['bytes_per_token']:,}", f"{r['ratio_to_mha']:.3f}{mark}", f"{r['max_context']:,}"]
        if has_batch:
            line.append(f"{r['max_context_batch']:,}")
        body.append(line)
    left = {0, 1, 5}
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    dtype = rows[0]["dtype_bytes"]
    out.append("")
    out.append(f"bytes/token = KV/token/layer x L x {dtype} bytes; max ctx = floor({gb_text} * 2^30 / "
               f"bytes/token) (GiB; KV cache only, batch 1" + (", and per sequence for the batch)" if has_batch
                                                              else ")"))
    if not marked:
        out.append(f"vs MHA: bytes/token relative to {baselines[0]}")
    else:
        for i, b in enumerate(baselines):
            out.append(f"vs MHA [{i + 1}]: relative to {b}")
    return "\n".join(out)


def _is_proxy(row: dict) -> bool:
    return row["ratio_baseline"].startswith("2*h*d_h of ")


def plot(rows: Sequence[dict], path: str, max_context: int = 2 ** 20, memory_gb: Optional[float] = None) -> str:
    """Cache bytes (batch 1) vs context length, log-log, at powers of two up to ``max_context``.

    One line per row; ``memory_gb`` (GiB, default: the rows' budget) is drawn as a horizontal line.
    Uses the Agg canvas directly (no pyplot state, no display needed).  Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not rows:
        raise ValueError("plot: no rows")
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise ValueError(f"max_context: expected an integer >= 1, got {max_context!r}")
    if memory_gb is None:
        memory_gb = rows[0]["memory_gb"]
    contexts = [2 ** i for i in range(max_context.bit_length()) if 2 ** i <= max_context]
    fig = Figure(figsize=(9, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = "os^vDP*Xph<>"
    for i, r in enumerate(rows):
        ax.plot(contexts, [c * r["bytes_per_token"] for c in contexts], marker=markers[i % len(markers)],
                markersize=3, linewidth=1.5,
                label=f"{r['name']} ({r['bytes_per_token']:,} B/token; fits {r['max_context']:,} tokens)")
    budget = memory_gb * GIB
    ax.axhline(budget, color="black", linestyle="--", linewidth=1.2, label=f"budget {memory_gb:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(LogLocator(base=2 ** 5))  # 1 KiB, 32 KiB, 1 MiB, 32 MiB, 1 GiB, ...
    ax.yaxis.set_minor_locator(LogLocator(base=2, subs=(1.0,), numticks=64))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: _fmt_bytes(y, digits=0)))
    ax.xaxis.set_major_locator(LogLocator(base=2 ** 2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _fmt_count(x)))
    ax.set_xlabel("context length (tokens, batch 1)")
    ax.set_ylabel("KV-cache size (bytes, whole model)")
    dtype = rows[0]["dtype_bytes"]
    ax.set_title(f"KV cache vs context length ({dtype}-byte elements; budget {memory_gb:g} GiB)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
