"""Linen models in the style of Flax's examples (lm1b, ImageNet ResNet), not for jaxq."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class DecoderLayer(nn.Module):
    d: int = 64
    heads: int = 4

    @nn.compact
    def __call__(self, x, _):
        t = x.shape[1]
        mask = nn.make_causal_mask(jnp.ones((x.shape[0], t)))
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True)(h, mask=mask)
        x = x + nn.Dropout(0.1, deterministic=True)(h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.d)(h)
        h = nn.Dense(self.d)(nn.gelu(h))
        return x + h, None


class TransformerLM(nn.Module):
    vocab: int = 256
    d: int = 64
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d)
        x = embed(tokens)
        Stack = nn.scan(DecoderLayer, variable_axes={"params": 0, "jaxq": 0},
                        split_rngs={"params": True}, length=self.layers)  # fmt: skip
        x, _ = Stack(self.d, name="layers")(x, None)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


class ResNetBlock(nn.Module):
    filters: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(x)
        y = nn.BatchNorm(use_running_average=not train)(y)
        y = nn.relu(y)
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=not train, scale_init=nn.initializers.zeros)(y)
        return nn.relu(x + y)


class ResNet(nn.Module):
    filters: int = 16
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.filters, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        for _ in range(2):
            x = ResNetBlock(self.filters)(x, train)
        return nn.Dense(self.classes, name="head")(jnp.mean(x, axis=(1, 2)))
