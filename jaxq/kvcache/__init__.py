"""Quantized key/value cache for autoregressive decoding, and a decode loop for GPT.

Keys are quantized per channel over blocks of ``group_size`` positions, values per token
(KIVI); int4 codes are packed two per byte; an optional float window keeps the most recent
``residual`` tokens exact. See :mod:`jaxq.kvcache.kivi` for the quantization and reading
rule, :mod:`jaxq.kvcache.cache` for the storage, :mod:`jaxq.kvcache.attention` for the
attention that reads it (grouped-query heads, a sliding window, keys cached before RoPE), and
:mod:`jaxq.kvcache.gpt` for prefill, decode, generate and the teacher-forced loss of
:class:`jaxq.models.GPT`.

Example:
    >>> from jaxq import kvcache
    >>> cache = kvcache.init(2, 4, 64, 16, fmt="int4", group_size=16, layers=2)
    >>> kvcache.nbytes_per_token(cache, windows=False)  # 64 code bytes + 16 + 16 scale bytes
    96.0
"""

from jaxq.kvcache.attention import attend, teacher_forced_attention, update_attend
from jaxq.kvcache.cache import KVCache, init, nbytes_per_token, read, shardings, update
from jaxq.kvcache.gpt import (
    cache_for,
    decode_step,
    generate,
    prefill,
    teacher_forced_logits,
    teacher_forced_loss,
)
from jaxq.kvcache.kivi import FORMATS

__all__ = [
    "FORMATS",
    "KVCache",
    "init",
    "update",
    "read",
    "attend",
    "update_attend",
    "nbytes_per_token",
    "shardings",
    "teacher_forced_attention",
    "cache_for",
    "prefill",
    "decode_step",
    "generate",
    "teacher_forced_logits",
    "teacher_forced_loss",
]
