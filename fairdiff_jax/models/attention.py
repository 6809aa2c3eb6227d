"""Attention through ``jax.nn.dot_product_attention`` for the diffusers U-Net / VAE and the CLIP towers.

diffusers' Flax attention builds the full ``[B*heads, T, S]`` score tensor (at SD-1.5 size 1 GiB in float32
for each 64x64 self-attention layer, kept for the backward). :func:`attend` computes the same attention as
``jax.nn.dot_product_attention`` with one of these implementations:

  ``auto``     cuDNN flash attention on a GPU where it applies (bfloat16 / float16, head dim a multiple of 8),
               otherwise ``chunked`` for long queries; short ones ``matmul`` on a CPU and ``xla`` elsewhere;
  ``xla``      ``jax.nn.dot_product_attention``'s XLA path (scores materialised, softmax in float32);
  ``cudnn``    cuDNN flash attention (GPU only; raises where cuDNN cannot run it);
  ``chunked``  the XLA path over query chunks of ``query_chunk`` rows, each rematerialised, so the backward
               holds one chunk's scores (the CPU/TPU fallback for memory);
  ``matmul``   two batched matmuls in head-major layout with a hand-written backward that keeps the softmax
               probabilities (``dS = P * (dP - rowsum(dP * P))``): on XLA:CPU the autodiff of the ``xla`` path
               transposes inside the backward, and this saves that time at the same memory;
  ``splash``   the Pallas splash-attention kernel for TPU (``jax.experimental.pallas.ops.tpu``; flash attention
               with a block-sparse mask, nothing quadratic kept for the backward); sequences padded to blocks of
               128, the padded keys masked. Opt-in (``--config.model.attention=splash``): it is tested against the
               stock attention in Pallas' interpreter on a CPU, not run on a TPU here. Data-dependent masks (CLIP's
               padding) take ``chunked``. Elsewhere than on a TPU it runs interpreted (slow; for tests);
  ``stock``    the modules' own code, unchanged.

The module classes below subclass the originals (same parameters and names) and are swapped in by
``fairdiff_jax.models.patches``; the choice is read when a function is traced.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from diffusers.models import attention_flax, vae_flax
from transformers.models.clip import modeling_flax_clip

from fairdiff_jax.errors import FairdiffError

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "FusedCLIPAttention",
    "FusedFlaxAttention",
    "FusedVAEAttentionBlock",
    "attend",
    "attention_implementation",
    "run_attention",
]

log = logging.getLogger(__name__)
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "matmul", "splash", "stock")
SPLASH_BLOCK = 128  # the TPU kernel's lane width: sequences are padded to a multiple of it
_settings = {"implementation": "auto", "query_chunk": 256}


def _check_implementation(implementation: str) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise FairdiffError(
            f"unknown attention implementation '{implementation}'; choose one of {list(ATTENTION_IMPLEMENTATIONS)} "
            "('auto' uses cuDNN flash attention on GPUs and query chunking for long sequences elsewhere)."
        )


@contextlib.contextmanager
def attention_implementation(implementation: str, query_chunk: int | None = None) -> Iterator[None]:
    """Within the block, trace the patched attention modules with ``implementation`` (and ``query_chunk`` rows).

    Read when a function is traced; ``jax.jit`` caches traces per function object, so jit a new function inside.
    """
    _check_implementation(implementation)
    if query_chunk is not None and int(query_chunk) < 1:
        raise FairdiffError(f"attention query_chunk must be >= 1 (got {query_chunk}).")
    previous = dict(_settings)
    _settings["implementation"] = implementation
    if query_chunk is not None:
        _settings["query_chunk"] = int(query_chunk)
    try:
        yield
    finally:
        _settings.update(previous)


@contextlib.contextmanager
def run_attention(implementation: str) -> Iterator[None]:
    """:func:`attention_implementation` for a training or generation run: refuses, in one line, a kernel this
    backend cannot run (``splash`` off a TPU would run interpreted, ``cudnn`` needs a GPU)."""
    _check_implementation(implementation)
    backend = jax.default_backend()
    needs = {"splash": "tpu", "cudnn": "gpu"}.get(implementation)
    if needs and backend != needs:
        raise FairdiffError(
            f"model.attention='{implementation}' runs on a {needs.upper()} only and this run's backend is {backend}; "
            "use --config.model.attention=auto"
        )
    with attention_implementation(implementation):
        yield


def _chunked(query, key, value, mask, is_causal: bool, scale: float, chunk: int) -> jax.Array:
    """XLA attention over ``ceil(T / chunk)`` query chunks in a ``lax.map``, each chunk rematerialised."""
    batch, length, heads, dim = query.shape
    count = math.ceil(length / chunk)
    if count == 1 or length % count:
        return jax.nn.dot_product_attention(
            query, key, value, mask=mask, is_causal=is_causal, scale=scale, implementation="xla"
        )
    rows = length // count
    if is_causal:  # causality as an explicit mask, since each chunk sits at its own query offset
        causal = jnp.arange(length)[:, None] >= jnp.arange(key.shape[1])[None, :]
        mask = causal[None, None] if mask is None else jnp.logical_and(mask, causal[None, None])
    queries = jnp.moveaxis(query.reshape(batch, count, rows, heads, dim), 1, 0)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], length, key.shape[1]))
        masks = jnp.moveaxis(mask.reshape(*mask.shape[:2], count, rows, key.shape[1]), 2, 0)
    else:
        masks = None

    @jax.checkpoint
    def one_chunk(q_and_mask):
        q, m = q_and_mask
        return jax.nn.dot_product_attention(q, key, value, mask=m, scale=scale, implementation="xla")

    out = jax.lax.map(one_chunk, (queries, masks))  # [count, B, rows, N, H]
    return jnp.moveaxis(out, 0, 1).reshape(batch, length, heads, value.shape[-1])


def _softmax_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # float32 at least, as jax.nn.dot_product_attention


@jax.custom_vjp
def _matmul_core(query, key, value, bias):
    """``softmax(q k^T + bias) v`` on head-major ``[B,N,T,H]`` inputs (``q`` already scaled)."""
    return _matmul_forward(query, key, value, bias)[0]


def _matmul_forward(query, key, value, bias):
    scores = jnp.einsum("bnth,bnsh->bnts", query, key, preferred_element_type=_softmax_dtype(query.dtype))
    probs = jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)
    out = jnp.einsum("bnts,bnsh->bnth", probs.astype(value.dtype), value)
    return out, (query, key, value, probs, bias)


def _matmul_backward(residuals, d_out):
    query, key, value, probs, bias = residuals
    d_value = jnp.einsum("bnts,bnth->bnsh", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bnth,bnsh->bnts", d_out, value, preferred_element_type=probs.dtype)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_scores = d_scores.astype(query.dtype)
    d_query = jnp.einsum("bnts,bnsh->bnth", d_scores, key)
    d_key = jnp.einsum("bnts,bnth->bnsh", d_scores, query)
    return d_query, d_key, d_value, None if bias is None else jnp.zeros_like(bias)


_matmul_core.defvjp(_matmul_forward, _matmul_backward)


def _matmul(query, key, value, mask, is_causal: bool, scale: float) -> jax.Array:
    """Attention as two head-major batched matmuls with the hand-written backward of :func:`_matmul_core`."""
    if is_causal:
        causal = jnp.arange(query.shape[1])[:, None] >= jnp.arange(key.shape[1])[None, :]
        mask = causal[None, None] if mask is None else jnp.logical_and(mask, causal[None, None])
    bias = None
    if mask is not None:  # a large finite negative (not -inf) keeps fully masked rows finite, as jax.nn does
        bias = jnp.where(mask, 0.0, 0.7 * jnp.finfo(_softmax_dtype(query.dtype)).min).astype(
            _softmax_dtype(query.dtype)
        )
    heads_first = (0, 2, 1, 3)
    q, k, v = (jnp.transpose(x, heads_first) for x in (query * jnp.asarray(scale, query.dtype), key, value))
    return jnp.transpose(_matmul_core(q, k, v, bias), heads_first)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, queries: int, keys: int, real_keys: int, causal: bool, interpret: bool):
    """A splash-attention kernel for ``[heads, queries, dim]`` inputs whose keys past ``real_keys`` are padding."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    if real_keys == keys:  # no padded keys: the kernel's own (lazily evaluated) full or causal mask
        head_mask = masks.CausalMask((queries, keys)) if causal else masks.FullMask((queries, keys))
    else:
        allowed = np.zeros((queries, keys), dtype=np.bool_)
        allowed[:, :real_keys] = True
        if causal:
            allowed &= np.arange(queries)[:, None] >= np.arange(keys)[None, :]
        head_mask = masks.NumpyMask(allowed)

    def block(length: int) -> int:
        return max(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)

    bq, bk = block(queries), block(keys)
    sizes = kernel.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
        block_q_dq=bq, block_kv_dq=bk,
    )  # fmt: skip
    mask = masks.MultiHeadMask(tuple(head_mask for _ in range(heads)))
    return kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(query, key, value, is_causal: bool, scale: float) -> jax.Array:
    """Splash attention over ``[B,T,N,H]`` inputs: queries and keys zero-padded to blocks, the padded keys masked,
    the padded query rows dropped; the kernel is vmapped over the batch."""
    batch, length, heads, _ = query.shape
    keys = key.shape[1]
    pad_q, pad_k = -length % SPLASH_BLOCK, -keys % SPLASH_BLOCK
    kernel = _splash_kernel(heads, length + pad_q, keys + pad_k, keys, bool(is_causal), jax.default_backend() != "tpu")

    def heads_first(x, pad):
        return jnp.transpose(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), (0, 2, 1, 3))

    q = heads_first(query * jnp.asarray(scale, query.dtype), pad_q)
    out = jax.vmap(kernel)(q, heads_first(key, pad_k), heads_first(value, pad_k))
    return jnp.transpose(out, (0, 2, 1, 3))[:, :length]


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Softmax attention ``[B,T,N,H] x [B,S,N,H] -> [B,T,N,H]`` (``mask`` bool, broadcastable to ``[B,N,T,S]``).

    ``implementation`` defaults to the current setting (see the module docstring).
    """
    implementation = implementation or _settings["implementation"]
    _check_implementation(implementation)
    dtype = jnp.result_type(query, key, value)  # an fp32 adaptor branch on some projections promotes, as einsum would
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
    if implementation in ("auto", "cudnn"):
        cudnn_possible = jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
        if cudnn_possible or implementation == "cudnn":
            try:
                return jax.nn.dot_product_attention(
                    query, key, value, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn"
                )
            except (NotImplementedError, ValueError, RuntimeError) as err:
                if implementation == "cudnn":
                    raise FairdiffError(
                        f"cuDNN attention cannot run {tuple(query.shape)} x {tuple(key.shape)} {query.dtype} here "
                        f"({err}); use attention implementation 'auto' or 'chunked'."
                    ) from err
                log.debug("cuDNN attention unavailable for %s: %s", query.shape, err)
        short = math.ceil(query.shape[1] / _settings["query_chunk"]) == 1
        implementation = "matmul" if short and jax.default_backend() == "cpu" else "chunked"
    if implementation == "splash":
        if mask is None:
            return _splash(query, key, value, is_causal, scale)
        implementation = "chunked"  # a data-dependent mask cannot be the kernel's static block mask
    if implementation == "matmul":
        return _matmul(query, key, value, mask, is_causal, scale)
    if implementation == "chunked":
        return _chunked(query, key, value, mask, is_causal, scale, _settings["query_chunk"])
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=is_causal, scale=scale, implementation="xla"
    )


def _stock() -> bool:
    return _settings["implementation"] == "stock"


class FusedFlaxAttention(attention_flax.FlaxAttention):
    """diffusers' U-Net ``FlaxAttention`` (self- and cross-attention) with its core computed by :func:`attend`."""

    def __call__(self, hidden_states, context=None, deterministic=True):
        if _stock():
            return super().__call__(hidden_states, context, deterministic)
        context = hidden_states if context is None else context
        batch = hidden_states.shape[0]
        heads = (batch, -1, self.heads, self.dim_head)
        query = self.query(hidden_states).reshape(heads)
        key = self.key(context).reshape(heads)
        value = self.value(context).reshape(heads)
        out = attend(query, key, value, scale=self.scale).reshape(batch, -1, self.heads * self.dim_head)
        return self.dropout_layer(self.proj_attn(out), deterministic=deterministic)


class FusedVAEAttentionBlock(vae_flax.FlaxAttentionBlock):
    """diffusers' VAE mid-block attention with its core computed by :func:`attend`."""

    def __call__(self, hidden_states):
        if _stock():
            return super().__call__(hidden_states)
        residual = hidden_states
        batch, height, width, channels = hidden_states.shape
        tokens = self.group_norm(hidden_states).reshape(batch, height * width, channels)
        heads = (batch, height * width, self.num_heads, channels // self.num_heads)
        query, key, value = (proj(tokens).reshape(heads) for proj in (self.query, self.key, self.value))
        out = attend(query, key, value).reshape(batch, height * width, channels)
        return self.proj_attn(out).reshape(batch, height, width, channels) + residual


class FusedCLIPAttention(modeling_flax_clip.FlaxCLIPAttention):
    """transformers' ``FlaxCLIPAttention`` (causal in the text tower) with its core computed by :func:`attend`.

    Returning attention weights or attention dropout keep the original code.
    """

    def __call__(self, hidden_states, attention_mask=None, deterministic: bool = True, output_attentions=False):
        if _stock() or output_attentions or (not deterministic and self.dropout > 0.0):
            return super().__call__(hidden_states, attention_mask, deterministic, output_attentions)
        split = hidden_states.shape[:2] + (self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).reshape(split)
        key = self.k_proj(hidden_states).reshape(split)
        value = self.v_proj(hidden_states).reshape(split)
        mask = None if attention_mask is None else (attention_mask > 0)[:, None, None, :]
        out = attend(query, key, value, mask=mask, is_causal=self.causal, scale=self.scale)
        return (self.out_proj(out.reshape(hidden_states.shape[:2] + (self.embed_dim,))),)
