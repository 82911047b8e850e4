"""Text table and figure of a decode-benchmark result (``tpa_jax.eval.decode_bench``).

* :func:`format_table` -- per (d_model, batch): ms per step of each mechanism at every context,
  each as a multiple of its measured memory-bound limit, and TPA's time ratios to the others; then
  TPA's prefill time per token, Alg. 1 vs materialize;
* :func:`plot` -- ms per token (log axis) vs log2(context length), one panel per d_model, in the
  colours of the paper's Figs. 7-8, each mechanism's measured limit dotted beside it (Agg canvas,
  no display).
"""
from __future__ import annotations

import math
from typing import Optional

__all__ = ["TARGET", "COLORS", "format_table", "plot"]

TARGET = "tpa"  # the mechanism every ratio compares against the others
# colours of the paper's Figs. 7-8 (MHA orange, MQA purple, GQA green, MLA blue, TPA red)
COLORS = {"mha": "tab:orange", "mqa": "tab:purple", "gqa": "tab:green", "mla": "tab:blue", "tpa": "tab:red"}


def _fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "skip"
    ms = 1e3 * seconds
    return f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def format_table(result: dict) -> str:
    """Per (d_model, batch): one line per context with ms per step of each mechanism and TPA's ratios."""
    cfg = result["config"]
    mechs = cfg["mechanisms"]
    timed = {(e["d_model"], e["batch"], e["context"], e["mechanism"]): e for e in result["entries"]}
    ratio_rows = {(r["d_model"], r["batch"], r["context"]): r for r in result["ratios"]}
    keys = [f"{TARGET}/{m}" for m in mechs if m != TARGET] if TARGET in mechs else []
    head = ["context"] + list(mechs) + [f"{m} x lim" for m in mechs] + keys
    blocks = [f"per-token decode time in ms (one step = one token for each sequence; {cfg['dtype']}, "
              f"decode_impl={cfg['decode_impl']}, {cfg['n_layer']} layer(s), {cfg['device_kind']}); "
              f"x lim: the step time over the time to stream its bytes (cache + parameters); "
              f"ratios < 1: TPA faster"]
    for d in () if cfg.get("prefill_only") else cfg["d_models"]:
        for b in cfg["batch_sizes"]:
            rows = [head]
            for s in cfg["contexts"]:
                cells = [f"{s:,}"]
                cells += [_fmt_ms(timed[(d, b, s, m)]["per_token_s"]) if (d, b, s, m) in timed else "skip"
                          for m in mechs]
                cells += [f"{timed[(d, b, s, m)]['x_limit']:.2f}" if (d, b, s, m) in timed else "-" for m in mechs]
                rr = ratio_rows.get((d, b, s), {"time": {}})["time"]
                cells += [f"{rr[k]:.3f}" if k in rr else "-" for k in keys]
                rows.append(cells)
            widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
            lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
            lines.insert(1, "  ".join("-" * w for w in widths))
            blocks.append(f"\nd_model {d} ({d // cfg['head_dim']} heads, d_h {cfg['head_dim']}), batch {b}\n"
                          + "\n".join(lines))
    if result["skipped"]:
        blocks.append(f"\n{len(result['skipped'])} point(s) skipped: cache above the "
                      f"{cfg['memory_cap_gb']:g} GiB memory cap")
    if result.get("prefill", {}).get("lengths"):
        blocks.append(_prefill_table(result["prefill"]))
    return "\n".join(blocks)


def _aligned(rows: list) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _prefill_table(prefill: dict) -> str:
    """TPA's cached prefill: microseconds per prompt token of each impl and their ratio."""
    timed = {(e["d_model"], e["prompt"], e["prefill_impl"]): e for e in prefill["entries"]}
    rows = [["d_model", "prompt", "chunk"] + [f"{i} us/tok" for i in prefill["impls"]] + ["flash/materialize"]]
    for r in prefill["ratios"]:
        cells = [str(r["d_model"]), f"{r['prompt']:,}", str(r["chunk"])]
        for impl in prefill["impls"]:
            e = timed.get((r["d_model"], r["prompt"], impl))
            cells.append(f"{1e6 * e['per_token_s']:.2f}" if e else "skip")
        t = r["time"].get("flash/materialize")
        rows.append(cells + [f"{t:.3f}" if t is not None else "-"])
    return (f"\nTPA cached prefill, time per prompt token (batch 1, {prefill['chunk']}-token chunks; "
            f"flash = FlashTPA Alg. 1, materialize = K/V rebuilt; ratio < 1: Alg. 1 faster)\n" + _aligned(rows))


def plot(result: dict, png_path: str) -> str:
    """Milliseconds per token (log axis) vs log2(context), one panel per d_model, a line per
    mechanism and batch.

    Batch sizes differ by marker and line style; each line's measured limit (``limit_s``: streaming
    its bytes) is drawn beside it as a thin dotted line of its colour, and with a ``bandwidth`` the
    memory-bound times of the largest batch as thin dash-dotted lines.  Agg canvas (no display);
    returns ``png_path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cfg = result["config"]
    if not result["entries"]:
        raise ValueError("plot: the result has no measured entries")
    d_models = cfg["d_models"]
    styles, markers = ["-", "--", "-.", ":"], "os^vDP"
    fig = Figure(figsize=(6.5 * len(d_models), 5), dpi=110)
    FigureCanvasAgg(fig)
    for i, d in enumerate(d_models):
        ax = fig.add_subplot(1, len(d_models), i + 1)
        for j, b in enumerate(cfg["batch_sizes"]):
            for m in cfg["mechanisms"]:
                pts = sorted((e["context"], e) for e in result["entries"]
                             if e["d_model"] == d and e["batch"] == b and e["mechanism"] == m)
                if not pts:
                    continue
                x = [math.log2(c) for c, _ in pts]
                ax.plot(x, [1e3 * e["per_token_s"] for _, e in pts], color=COLORS.get(m),
                        linestyle=styles[j % len(styles)], marker=markers[j % len(markers)], markersize=3,
                        linewidth=1.5, label=f"{m.upper()} (batch {b})")
                ax.plot(x, [1e3 * e["limit_s"] for _, e in pts], color=COLORS.get(m), linestyle=":",
                        marker=markers[j % len(markers)], markersize=2, linewidth=0.9, alpha=0.7,
                        label=f"{m.upper()} limit (batch {b})")
                if cfg.get("bandwidth_bytes_per_s") and b == cfg["batch_sizes"][-1]:
                    ax.plot(x, [1e3 * e["memory_bound_s"] for _, e in pts], color=COLORS.get(m),
                            linestyle="-.", linewidth=0.6, alpha=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("log2(context length)")
        ax.set_yscale("log")
        ax.set_ylabel("time per token (ms, log scale); dotted: streaming limit")
        ax.set_title(f"d_model {d} ({d // cfg['head_dim']} heads, d_h {cfg['head_dim']})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=len(cfg["batch_sizes"]))
    fig.suptitle(f"One-token decode step vs context ({cfg['dtype']}, decode_impl={cfg['decode_impl']}, "
                 f"{cfg['n_layer']} layer(s), {cfg['device_kind']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, format="png")
    return png_path
