"""``scan`` under scalify on every supported JAX: operand counts from public structure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.scaled import as_scaled_array, asarray, scalify
from jaxq.scaled.control import scan_counts


def _scan_eqn(fn, *args):
    eqns = [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "scan"]
    assert len(eqns) == 1
    return eqns[0]


CASES = {
    # const, carry and per-step output all of shape (3,): shapes alone are ambiguous
    # without the stacked axis, which scan_counts relies on
    "same_shapes": (
        lambda w, c, xs: jax.lax.scan(lambda c, x: (c * w + x, c * w), c, xs),
        (jnp.ones(3), jnp.ones(3), jnp.ones((5, 3))),
        (1, 1),
    ),
    "no_consts_two_carries": (
        lambda c, xs: jax.lax.scan(lambda c, x: ((c[0] + x, c[1] * 2), x), c, xs),
        ((jnp.ones(3), jnp.ones(())), jnp.ones((4, 3))),
        (0, 2),
    ),
    "literal_carry": (  # a Python number in the carry reaches the rule as a literal
        lambda xs: jax.lax.scan(lambda c, x: ((c[0] + 1, c[1] + x), x * 2), (0, 0.0), xs),
        (jnp.ones(4),),
        (0, 2),
    ),
    "no_xs": (
        lambda w, c: jax.lax.scan(lambda c, _: (c @ w, c), c, None, length=3),
        (jnp.ones((3, 3)), jnp.ones(3)),
        (1, 1),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_counts(name):
    fn, args, want = CASES[name]
    eqn = _scan_eqn(fn, *args)
    got = scan_counts(
        [v.aval for v in eqn.invars], [v.aval for v in eqn.outvars], eqn.params["jaxpr"]
    )
    assert got == want
    if "num_consts" in eqn.params:  # JAX <= 0.10 also names them
        assert got == (eqn.params["num_consts"], eqn.params["num_carry"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_scalified_scan_matches(name):
    fn, args, _ = CASES[name]
    leaves, tree = jax.tree_util.tree_flatten(args)
    scaled = jax.tree_util.tree_unflatten(
        tree, [as_scaled_array(x * 2.0**-20, 2.0**-20) for x in leaves]
    )
    got = jax.jit(scalify(fn))(*scaled)
    want = fn(*jax.tree_util.tree_unflatten(tree, [x * 2.0**-20 for x in leaves]))
    for g, w in zip(jax.tree_util.tree_leaves(got, is_leaf=lambda x: hasattr(x, "scale")),
                    jax.tree_util.tree_leaves(want), strict=True):  # fmt: skip
        np.testing.assert_allclose(asarray(g), w, rtol=1e-6)
