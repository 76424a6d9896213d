"""The default text corpus for examples, fidelity runs and the demo.

The corpus is the standard library's own Python source, which every Python installation
carries, so nothing is downloaded. Text is tokenised at the byte level (vocabulary 256).

Example:
    >>> import jax
    >>> from jaxq import data
    >>> tokens = data.load_tokens(max_bytes=100_000)
    >>> train, val = data.split(tokens)
    >>> x, y = data.batch(train, jax.random.key(0), batch_size=4, seq_len=32)
    >>> x.shape, y.shape
    ((4, 32), (4, 32))
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["VOCAB_SIZE", "stdlib_files", "load_text", "load_tokens", "split", "batch"]

VOCAB_SIZE = 256


def stdlib_files() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def load_text(path: str | Path | None = None, *, max_bytes: int = 4_000_000) -> bytes:
    """Reads ``path`` (any text file), or the standard-library corpus when ``None``.

    At most ``max_bytes`` bytes are returned.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if path is not None:
        return Path(path).read_bytes()[:max_bytes]
    chunks, total = [], 0
    for f in stdlib_files():
        b = f.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def load_tokens(path: str | Path | None = None, *, max_bytes: int = 4_000_000) -> np.ndarray:
    """Byte-level tokens (``int32`` in ``[0, 256)``) of :func:`load_text`."""
    return np.frombuffer(load_text(path, max_bytes=max_bytes), dtype=np.uint8).astype(np.int32)


def split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Splits tokens into a leading train part and a trailing validation part."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def batch(
    tokens: np.ndarray | jax.Array, key: jax.Array, *, batch_size: int, seq_len: int
) -> tuple[jax.Array, jax.Array]:
    """Random windows of ``seq_len + 1`` tokens: returns ``(inputs, next-token targets)``.

    Both have shape ``(batch_size, seq_len)``. Jittable with static sizes.
    """
    tokens = jnp.asarray(tokens)
    if tokens.shape[0] <= seq_len + 1:
        raise ValueError(
            f"tokens has length {tokens.shape[0]}, need more than seq_len + 1 = {seq_len + 1}"
        )
    starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - seq_len - 1)
    idx = starts[:, None] + jnp.arange(seq_len + 1)[None, :]
    windows = tokens[idx]
    return windows[:, :-1], windows[:, 1:]
