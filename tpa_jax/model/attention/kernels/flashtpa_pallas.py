"""FlashTPA decoding as a Pallas TPU kernel (paper Algorithm 3, generalised to any R_K, R_V).

Same signature and semantics as :func:`tpa_jax.model.attention.flashtpa.flashtpa_decode`.

Grid ``(B, ceil(S / block))``: the batch axis is "parallel", the cache-block axis "arbitrary"; one
program sees one block of ``block`` cache rows of one sequence (never the whole cache) and carries
the float32 online-softmax state (running max m, running sum l, accumulator) in VMEM scratch
across the block axis.  The per-row lengths are scalar-prefetched into SMEM
(``PrefetchScalarGridSpec``): blocks at or past a row's length are skipped (``pl.when``), and the
cache index maps clamp the block index to the row's last filled block, so a skipped step asks for
the block already in VMEM and no DMA is issued.

TPU layout.  Every block's last two dims are multiples of (8, 128) or the full array dims: the
cache factors are viewed (a free reshape) as ``a_k [B, S, R*H]``, ``b_k [B, S, R*D]``,
``a_v [B, S, U*H]``, ``b_v [B, S, U*E]``, blocked only over S (``block`` a multiple of 8, or S),
with the whole (rank x head) or (rank x feature) row in lanes; heads are never tiled, so any head
count (34, 47, 61, 78 in the paper) and any rank works without padding.  Everything in the kernel
is a 2-D matmul, an elementwise op or a reduction over rows -- no strided or unaligned slices.
Per cache block of S rows (row s, rank r or u, head h; (r, h) is lane r*H + h):

    S1 = b_K W1            [S, R P]   W1 = I_R (x) B_Q^T        (S1[s, (r, p)] = <b_K[s, r], B_Q[p]>)
    S2 = S1 W2             [S, R H]   W2 = I_R (x) c A_Q,  c = scale / (R_Q R_K)
    L  = (S2 (.) a_K) F_K  [S, H]     F_K[(r, h), h'] = [h = h']: the sum over key ranks
    online softmax on L (rows at or past the length -> -inf)
    Y  = b_V^T ((p F_V^T) (.) a_V)    [U E, U H]   p repeated per value rank, times a_V
    acc += G_E (Y (.) Diag) F_V       [E, H]       the (u, u) diagonal blocks of Y, summed over u
    o = acc / (R_V l)

(F_V [U H, H] and G_E [E, U E] are 0/1 rank folds like F_K; Diag keeps the (u, u) blocks.)

W1 and W2 are the block-diagonal (Kronecker) forms of Alg. 3's per-rank GEMMs S1 = b_K B_Q^T,
S2 = S1 A_Q, built once per step outside the kernel (they are [R D, R P] and [R P, R H]).  The
accumulator is kept as [E, H] so that the [1, H] softmax statistics broadcast over its rows; the
wrapper returns o [B, H, E].  Cache rows at or past ``lengths[b]`` (or past S in a partial last
block) may hold anything, NaN included: their logits are masked and their value factors zeroed.

With ``new_kv`` (the step's own token's factors, the cache holding only the rows before it) the
softmax state starts from that token instead of empty: m = its logit, l = 1, acc = its value
(:func:`new_token_seed`, computed outside the kernel) -- the log-sum-exp merge of the token with
the cache, done by the online softmax itself.

The kernel body, the query weights and the pallas_call (:func:`decode_call`) are shared with the
paged-cache kernel (``flashtpa_paged_pallas``), which differs only in where a grid step's cache
block comes from: the index maps get the scalar-prefetched arrays, here only the lengths.

An int8 cache (``scales``: float32 [B, S, rank] per factor, ``tpa_jax.model.attention.quant``) adds
one scale block [S, rank] per factor beside its int8 block; the kernel dequantises each block it
reads (the scales repeated over the block's lanes by a 0/1 matmul [rank, rank n]).

Where it runs (``interpret``): ``None`` (the default, what the model uses) picks by the platform
the call is lowered for -- the compiled Mosaic kernel on TPU, the Pallas interpreter on CPU, and
on any other platform (GPU) the jnp FlashTPA of ``flashtpa.flashtpa_decode`` (same numbers; no
Triton form of this kernel is written).  ``False`` forces the compiled kernel (for ``jax.export``
with ``platforms=("tpu",)`` from a CPU host), ``True`` or a ``pltpu.InterpretParams`` forces an
interpreter.  Export for one platform at a time: a multi-platform export (e.g. ``("cpu", "tpu")``)
would ask Pallas to lower the compiled kernel for CPU too, which it refuses.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import flashtpa

__all__ = ["flashtpa_decode_pallas", "kv_block_index"]

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST
_SUBLANES = 8  # TPU tile: (8, 128); a cache block's row count must be a multiple of 8 (or all of S)
Ref = Any  # a Pallas memory reference: indexed like an array, written with ``ref[...] = value``


def kv_block_index(i: jax.Array, length: jax.Array, block: int) -> jax.Array:
    """The cache block that grid step ``i`` reads for a row of ``length`` filled rows: ``i``, clamped
    to the row's last filled block (block 0 when the row is empty), so skipped steps issue no DMA.
    Integer arithmetic only (``lax.div`` on non-negative values: no sign op in the index map)."""
    last = jnp.maximum(lax.div(length + (block - 1), block) - 1, 0)
    return jnp.minimum(i, last)


def _dot(x: jax.Array, y: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """Float32 2-D matmul contracting ``x``'s dim ``contract[0]`` with ``y``'s ``contract[1]``."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(x, y, dims, precision=(_HI, _HI), preferred_element_type=_F32)


def _fold(rank: int, n: int, *, ranked_rows: bool) -> jax.Array:
    """0/1 matrix [rank*n, n] (``ranked_rows``) or [n, rank*n] with a 1 where the ranked index
    (r, i) -> r*n + i and the plain index j have i == j: summing over ranks, or repeating per rank."""
    shape = (rank * n, n) if ranked_rows else (n, rank * n)
    big = lax.broadcasted_iota(jnp.int32, shape, 0 if ranked_rows else 1)
    small = lax.broadcasted_iota(jnp.int32, shape, 1 if ranked_rows else 0)
    hit = functools.reduce(jnp.logical_or, [big == small + r * n for r in range(rank)])
    return jnp.where(hit, 1.0, 0.0).astype(_F32)


def _diagonal_blocks(rank: int, rows: int, cols: int) -> jax.Array:
    """Boolean [rank*rows, rank*cols]: True on the (r, r) blocks of a rank x rank block matrix."""
    shape = (rank * rows, rank * cols)
    i, j = lax.broadcasted_iota(jnp.int32, shape, 0), lax.broadcasted_iota(jnp.int32, shape, 1)
    in_block = lambda x, r, n: (x >= r * n) & (x < (r + 1) * n)  # noqa: E731
    return functools.reduce(jnp.logical_or, [in_block(i, r, rows) & in_block(j, r, cols) for r in range(rank)])


def _spread(rank: int, n: int) -> jax.Array:
    """0/1 matrix [rank, rank*n]: row r has ones at lanes r*n .. r*n + n - 1 (a scale per rank, repeated)."""
    shape = (rank, rank * n)
    r, lane = lax.broadcasted_iota(jnp.int32, shape, 0), lax.broadcasted_iota(jnp.int32, shape, 1)
    return jnp.where((lane >= r * n) & (lane < (r + 1) * n), 1.0, 0.0).astype(_F32)


def _kernel(*refs: Ref, n_scalars: int, block: int, heads: int, k_rank: int, v_rank: int, quantized: bool,
            seeded: bool) -> None:
    """Grid step (b, i).  Refs, in order: ``n_scalars`` scalar-prefetched SMEM arrays, the first the
    per-row filled lengths [B] (the others only steer the index maps); w1 [R D, R P], w2 [R P, R H];
    ``seeded``: the new token's logit m0 [1, H] and value sum acc0 [E, H]; one cache block a_k [S, R H],
    b_k [S, R D], a_v [S, U H], b_v [S, U E] (``quantized``: int8, then their scale blocks [S, R] and
    [S, U]); out o [E, H]; scratch m, l [1, H], acc [E, H].  Row t of the block is cache row i S + t."""
    lengths_ref, refs = refs[0], refs[n_scalars:]
    (w1_ref, w2_ref), refs = refs[:2], refs[2:]
    (m0_ref, acc0_ref), refs = (refs[:2], refs[2:]) if seeded else ((None, None), refs)
    (a_k_ref, b_k_ref, a_v_ref, b_v_ref), refs = refs[:4], refs[4:]
    scale_refs, (o_ref, m_ref, l_ref, acc_ref) = (refs[:4], refs[4:]) if quantized else ((None,) * 4, refs)
    b, i = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    e = acc_ref.shape[0]

    def load(ref: Ref, scale_ref: Optional[Ref], rank: int) -> jax.Array:
        """A cache block as float32, an int8 one times its row scales spread over the lanes."""
        x = ref[...].astype(_F32)
        return x if scale_ref is None else x * _dot(scale_ref[...].astype(_F32), _spread(rank, x.shape[1] // rank))

    @pl.when(i == 0)
    def _init() -> None:
        if seeded:  # the new token's own key/value: one softmax term exp(m0 - m) of weight 1
            m_ref[...] = m0_ref[...].astype(_F32)
            l_ref[...] = jnp.ones(l_ref.shape, _F32)
            acc_ref[...] = acc0_ref[...].astype(_F32)
        else:
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, _F32)
            l_ref[...] = jnp.zeros(l_ref.shape, _F32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)

    @pl.when(i * block < length)  # the block holds at least one filled row
    def _step() -> None:
        filled = lambda width: i * block + lax.broadcasted_iota(jnp.int32, (block, width), 0) < length  # noqa: E731
        # logits (Alg. 3 steps S1, S2, S3 for all key ranks at once)
        s1 = _dot(load(b_k_ref, scale_refs[1], k_rank), w1_ref[...].astype(_F32))  # [S, R P]
        s2 = _dot(s1, w2_ref[...].astype(_F32))  # [S, R H]
        mixed = s2 * load(a_k_ref, scale_refs[0], k_rank)
        logits_SH = mixed if k_rank == 1 else _dot(mixed, _fold(k_rank, heads, ranked_rows=True))
        logits_SH = jnp.where(filled(heads), logits_SH, -jnp.inf)

        # online softmax; the block's first row is filled, so m_new is finite
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, logits_SH.max(axis=0, keepdims=True))
        p_SH = jnp.exp(logits_SH - m_new)  # unfilled rows -> 0
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + p_SH.sum(axis=0, keepdims=True)
        m_ref[...] = m_new

        # value aggregation from the factors: (p (.) a_V)^T b_V per value rank, summed over ranks
        a_v = jnp.where(filled(v_rank * heads), load(a_v_ref, scale_refs[2], v_rank), 0.0)  # [S, U H]
        b_v = jnp.where(filled(v_rank * e), load(b_v_ref, scale_refs[3], v_rank), 0.0)  # [S, U E]
        p_rep = p_SH if v_rank == 1 else _dot(p_SH, _fold(v_rank, heads, ranked_rows=False))
        y = _dot(b_v, p_rep * a_v, contract=(0, 0))  # [U E, U H]
        if v_rank > 1:
            y = jnp.where(_diagonal_blocks(v_rank, e, heads), y, 0.0)
            y = _dot(_dot(_fold(v_rank, e, ranked_rows=False), y), _fold(v_rank, heads, ranked_rows=True))
        acc_ref[...] = alpha * acc_ref[...] + y  # [E, H]

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish() -> None:
        l = l_ref[...]
        o = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0) / v_rank
        o_ref[...] = o.astype(o_ref.dtype)


def _block_rows(block_size: int, s_len: int) -> int:
    """Cache rows per grid step: all of S when ``block_size >= S``, else ``block_size`` (a multiple of 8)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if block_size >= s_len:
        return s_len
    if block_size % _SUBLANES:
        raise ValueError(f"block_size={block_size} must be a multiple of {_SUBLANES} (TPU tiling) when it is "
                         f"below the cache length {s_len}")
    return block_size


def query_weights(a_q_BPH: jax.Array, b_q_BPD: jax.Array, k_rank: int, coef: float) -> tuple[jax.Array, jax.Array]:
    """The block-diagonal query factors of one decode step, rank-major like the cache lanes:
    W1 = I_R (x) B_Q^T [B, R D, R P] and W2 = I_R (x) c A_Q [B, R P, R H] (c = ``coef``)."""
    eye = jnp.eye(k_rank, dtype=_F32)
    w1 = jax.vmap(lambda b_q_PD: jnp.kron(eye.astype(b_q_PD.dtype), b_q_PD.T))(b_q_BPD)
    w2 = jax.vmap(lambda a_q_PH: jnp.kron(eye, a_q_PH.astype(_F32) * coef))(a_q_BPH)
    return w1, w2


def new_token_seed(a_q_BPH: jax.Array, b_q_BPD: jax.Array, new_kv: tuple, coef: float) -> tuple[jax.Array, ...]:
    """The softmax state a decode step starts from when its own token comes apart from the cache
    (``new_kv``: a_k [B, R, H], b_k [B, R, D], a_v [B, U, H], b_v [B, U, E]): the token's logit
    m0 [B, 1, H] (running max m0, running sum 1) and its value summed over the value ranks,
    acc0 [B, E, H] -- the log-sum-exp merge of the token with the cache, done by the kernel's own
    online softmax."""
    a_k, b_k, a_v, b_v = (x.astype(_F32) for x in new_kv)
    feat_BPR = jnp.einsum("bpd,brd->bpr", b_q_BPD.astype(_F32), b_k, precision=_HI)
    logit_BH = jnp.einsum("bpr,bph,brh->bh", feat_BPR, a_q_BPH.astype(_F32) * coef, a_k, precision=_HI)
    return logit_BH[:, None, :], jnp.einsum("buh,bue->beh", a_v, b_v, precision=_HI)


def lane_view(x: jax.Array) -> jax.Array:
    """A factor [X, rows, rank, n] as [X, rows, rank n] (a free reshape: (rank, n) in lanes)."""
    return x.reshape(*x.shape[:2], -1)


def decode_call(scalars: tuple, a_q_BPH: jax.Array, b_q_BPD: jax.Array, cache: list, *, coef: float, k_rank: int,
                v_rank: int, block: int, steps: int, cache_index: Callable, new_kv: Optional[tuple],
                quantized: bool, out_dtype: Any, interpret: Any, name: str) -> jax.Array:
    """The pallas_call both decode kernels make: grid (B, ``steps``), o [B, H, E].

    ``scalars``: the scalar-prefetched int32 arrays, the first the filled cache rows per sequence [B];
    ``cache``: the four lane-viewed factors (then, ``quantized``, their four scale arrays), each
    [X, rows, width] and read ``block`` rows at a time from block ``(*cache_index(b, i, *scalars), 0)``
    (``cache_index`` gets the scalars' SMEM refs); ``new_kv``: the step's own token, merged by the
    kernel (:func:`new_token_seed`); ``interpret``: False for Mosaic, else an interpreter."""
    batch, p, h = a_q_BPH.shape
    d = b_q_BPD.shape[-1]
    r, u = k_rank, v_rank
    e = cache[3].shape[-1] // u
    w1, w2 = query_weights(a_q_BPH, b_q_BPD, r, coef)
    seed = [] if new_kv is None else list(new_token_seed(a_q_BPH, b_q_BPD, new_kv, coef))
    sq = pl.squeezed
    per_row = lambda shape: pl.BlockSpec((sq, *shape), lambda b_, i_, *_: (b_, 0, 0))  # noqa: E731
    cache_block = lambda width: pl.BlockSpec(  # noqa: E731
        (sq, block, width), lambda b_, i_, *refs: (*cache_index(b_, i_, *refs), 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(batch, steps),
        in_specs=[per_row((r * d, r * p)), per_row((r * p, r * h)), *(per_row(x.shape[1:]) for x in seed),
                  *(cache_block(c.shape[-1]) for c in cache)],
        out_specs=per_row((e, h)),
        scratch_shapes=[pltpu.VMEM((1, h), _F32), pltpu.VMEM((1, h), _F32), pltpu.VMEM((e, h), _F32)],
    )
    kernel = functools.partial(_kernel, n_scalars=len(scalars), block=block, heads=h, k_rank=r, v_rank=u,
                               quantized=quantized, seeded=new_kv is not None)
    o_BEH = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, e, h), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name=name,
    )(*scalars, w1, w2, *seed, *cache)
    return o_BEH.swapaxes(1, 2)


def check_factors(a_q_BPH: jax.Array, kv: tuple, new_kv: Optional[tuple], q_rank: int, k_rank: int,
                  v_rank: int) -> None:
    """One-line errors for factor ranks or head counts that disagree (cache factors [X, rows, rank, n])."""
    p, h = a_q_BPH.shape[1:]
    r, u = kv[0].shape[2], kv[2].shape[2]
    if p != q_rank or r != k_rank or u != v_rank:
        raise ValueError(f"factor ranks {(p, r, u)} do not match q_rank/k_rank/v_rank {(q_rank, k_rank, v_rank)}")
    if kv[0].shape[-1] != h or kv[2].shape[-1] != h:
        raise ValueError(f"head counts differ: a_q {h}, a_k {kv[0].shape[-1]}, a_v {kv[2].shape[-1]}")
    if new_kv is not None and len(new_kv) != 4:
        raise ValueError(f"new_kv must be the token's (a_k, b_k, a_v, b_v), got {len(new_kv)} arrays")


def float_scales(kv: tuple, scales: Optional[tuple]) -> Optional[tuple]:
    """An int8 cache's scales with a float factor's None replaced by ones (scale 1) of the factor's
    shape without its last two axes; None for a float cache."""
    if scales is None:
        return None
    return tuple(jnp.ones(x.shape[:3], _F32) if sc is None else sc for x, sc in zip(kv, scales))


def by_platform(call: Callable, fallback: Callable, args: tuple, interpret: Any) -> jax.Array:
    """``call(*args, interpret=...)`` with the ``interpret`` rule of the module docstring: None picks
    by the platform lowered for (Mosaic on TPU, the interpreter on CPU, ``fallback(*args)`` elsewhere)."""
    if interpret is not None:
        return call(*args, interpret=interpret)
    return lax.platform_dependent(*args, cpu=functools.partial(call, interpret=True),
                                  tpu=functools.partial(call, interpret=False), default=fallback)


@functools.partial(jax.jit, static_argnames=("q_rank", "k_rank", "v_rank", "scale", "block_size", "interpret"))
def flashtpa_decode_pallas(a_q_BPH: jax.Array, b_q_BPD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array,
                           a_v_BSUH: jax.Array, b_v_BSUE: jax.Array, lengths_B: jax.Array, *, q_rank: int,
                           k_rank: int, v_rank: int, scale: float, block_size: int = 256,
                           interpret: Optional[Any] = None, scales: Optional[tuple] = None,
                           new_kv: Optional[tuple] = None) -> jax.Array:
    """Pallas FlashTPA decode -> o [B, H, E] (see the module docstring).

    ``scales``: an int8 cache's (a_k, b_k, a_v, b_v scales [B, S, rank], None for a float factor).
    ``new_kv``: the current token's (a_k [B, R, H], b_k [B, R, D], a_v [B, U, H], b_v [B, U, E]);
    the cache then holds only the rows before it (rows < lengths - 1), as in ``flashtpa_decode``.

    ``block_size``: cache rows per grid step (a multiple of 8, or >= S for one block).
    ``interpret``: None picks by lowering platform (TPU kernel / CPU interpreter / jnp FlashTPA
    elsewhere); False forces the compiled kernel; True or ``pltpu.InterpretParams`` an interpreter.
    """
    kv = (a_k_BSRH, b_k_BSRD, a_v_BSUH, b_v_BSUE)
    check_factors(a_q_BPH, kv, new_kv, q_rank, k_rank, v_rank)
    batch, s_len = a_q_BPH.shape[0], a_k_BSRH.shape[1]
    block = _block_rows(block_size, s_len)
    seeded = new_kv is not None
    lengths_B = jnp.clip(jnp.asarray(lengths_B, jnp.int32).reshape(batch), 0, s_len + seeded)
    scales = float_scales(kv, scales)

    def call(a_q_BPH: jax.Array, b_q_BPD: jax.Array, *kv_and_lengths: jax.Array, interpret: Any) -> jax.Array:
        *kv, lengths = kv_and_lengths
        return decode_call(
            (jnp.maximum(lengths - seeded, 0),), a_q_BPH, b_q_BPD, [lane_view(x) for x in (*kv, *(scales or ()))],
            coef=scale / (q_rank * k_rank), k_rank=k_rank, v_rank=v_rank, block=block, steps=pl.cdiv(s_len, block),
            cache_index=lambda b_, i_, lens: (b_, kv_block_index(i_, lens[b_], block)), new_kv=new_kv,
            quantized=scales is not None, out_dtype=flashtpa._out_dtype(a_v_BSUH, b_v_BSUE), interpret=interpret,
            name="flashtpa_decode")

    fallback = functools.partial(flashtpa.flashtpa_decode, q_rank=q_rank, k_rank=k_rank, v_rank=v_rank, scale=scale,
                                 block_size=block_size, scales=scales, new_kv=new_kv)
    return by_platform(call, fallback, (a_q_BPH, b_q_BPD, *kv, lengths_B), interpret)
