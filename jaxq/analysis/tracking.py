"""``track_scales``: the scale (log2 RMS) of every tensor of a forward + backward pass.

How it works: ``fn``'s value-and-gradient is traced to a jaxpr (``jax.make_jaxpr``), then
that jaxpr is re-evaluated equation by equation inside one ``jax.jit``, where each
floating-point output is reduced on the fly to ``(log2 RMS, log2 amax, #non-finite)``; only
those statistics leave the device. Call-like equations (``jit``, ``remat``, ``closed_call``,
custom JVP/VJP calls) are entered, so the ops inside them are listed too; control flow
(``scan``, ``while``, ``cond``) is evaluated as one op and only its outputs are listed.
Names come from the JAX name stack and, for Flax NNX modules passed as arguments, from
module paths recovered as described in :mod:`jaxq.analysis.naming`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from jaxq.analysis.naming import ModuleIndex, Record, clean_scope, resolve_modules
from jaxq.analysis.report import ScaleReport, TensorScale

__all__ = ["track_scales"]

_CALL_PRIMITIVES = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)


def _inner_jaxpr(eqn) -> tuple[Jaxpr, list] | None:
    """The body of a call-like equation whose invars map one to one onto the eqn's."""
    if eqn.primitive.name not in _CALL_PRIMITIVES:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if isinstance(j, ClosedJaxpr):
            j, consts = j.jaxpr, list(j.consts)
        elif isinstance(j, Jaxpr):
            consts = []
        else:
            continue
        if len(j.invars) == len(eqn.invars):
            return j, consts
    return None


def _bind(eqn, invals):
    """Binds an equation's primitive like ``jax.core.eval_jaxpr`` does."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bound, tuple):  # older JAX: (subfuns, params)
        subfuns, params = bound
        invals = [*subfuns, *invals]
    else:
        params = bound
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
        return eqn.primitive.bind(*invals, **params)
    with ctx:
        return eqn.primitive.bind(*invals, **params)


def _is_float(aval) -> bool:
    dt = getattr(aval, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.inexact) and math.prod(aval.shape) > 0


def _stats(x) -> tuple[jax.Array, jax.Array]:
    """``([log2 rms, log2 amax], #non-finite)`` of ``x`` over its finite entries.

    Overflow-safe: the mean square is taken of ``x / amax``.
    """
    ct = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = jnp.abs(x).astype(ct)
    fin = jnp.isfinite(x)
    n_bad = jnp.sum(~fin, dtype=jnp.int32)
    a = jnp.where(fin, x, 0)
    amax = jnp.max(a)
    safe = jnp.where(amax > 0, amax, 1)
    n_fin = jnp.maximum(x.size - n_bad, 1).astype(ct)
    ms = jnp.sum(jnp.square(a / safe)) / n_fin
    log2_rms = jnp.log2(safe) + 0.5 * jnp.log2(ms)
    log2_rms = jnp.where(amax > 0, log2_rms, -jnp.inf)
    log2_amax = jnp.where(amax > 0, jnp.log2(safe), -jnp.inf)
    none = n_bad == x.size
    out = jnp.stack([jnp.where(none, jnp.nan, log2_rms), jnp.where(none, jnp.nan, log2_amax)])
    return out.astype(jnp.float32), n_bad


def _host_stats(x: np.ndarray) -> tuple[tuple[float, float], int]:
    """float64 numpy twin of :func:`_stats`."""
    a = np.abs(x).astype(np.float64)
    fin = np.isfinite(a)
    n_bad = int(a.size - np.count_nonzero(fin))
    if n_bad == a.size:
        return (math.nan, math.nan), n_bad
    a = a[fin] if n_bad else a.ravel()
    amax = float(a.max())
    if amax == 0:
        return (-math.inf, -math.inf), n_bad
    ms = float(np.mean(np.square(a / amax)))
    return (math.log2(amax) + 0.5 * math.log2(ms), math.log2(amax)), n_bad


def _frames(eqn) -> tuple:
    tb = getattr(eqn.source_info, "traceback", None)
    if tb is None:
        return ()
    try:
        codes, lastis = tb.raw_frames()
        out = [
            (c.co_filename, getattr(c, "co_qualname", c.co_name), tb.code_addr2line(c, i), i)
            for c, i in zip(codes, lastis, strict=True)
        ]
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - older jaxlib
        out = [(f.file_name, f.function_name, f.line_num, f.line_num) for f in tb.frames]
    return tuple(reversed(out))


def _internal(file: str) -> bool:
    return "/jax/_src/" in file or "/jaxlib/" in file or "/jaxq/analysis/" in file


def _user_source(frames: tuple) -> str:
    for f, _, line, _ in reversed(frames):
        if _internal(f) or "/flax/" in f or "/jax/" in f:
            continue
        return f"{f}:{line}"
    return ""


class _Walker:
    """Evaluates a jaxpr (under jit) recording each float output's statistics."""

    def __init__(self, leaf_paths: list[tuple | None]):
        self.leaf_paths = leaf_paths
        self.records: list[Record] = []
        self.outputs: list[tuple[int, int, Any]] = []  # (record id, output index, var)
        self.out_org: list = []
        self.values: list[jax.Array] = []

    def run(
        self, jaxpr: Jaxpr, consts, args, origins, *, scope: str, backward: bool, frames: tuple = ()
    ):
        env: dict = {}
        org: dict = {}  # var -> ("leaf", i) | ("rec", record id)
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = c
        for v, a, o in zip(jaxpr.invars, args, origins, strict=True):
            env[v] = a
            if o is not None:
                org[v] = o

        def read(v):
            return v.val if isinstance(v, Literal) else env[v]

        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            in_org = [None if isinstance(v, Literal) else org.get(v) for v in eqn.invars]
            ns = str(eqn.source_info.name_stack)
            bwd = backward or "transpose(" in ns
            sc = "/".join(p for p in (scope, clean_scope(ns)) if p)
            inner = _inner_jaxpr(eqn)
            fr = _frames(eqn)
            if frames:
                # Inside a call: the body may have been traced (and cached) elsewhere, so
                # the call site's frames come first.
                seen = set(frames)
                fr = frames + tuple(f for f in fr if f not in seen and not _internal(f[0]))
            if inner is not None:
                name = eqn.params.get("name")
                sub = "/".join(p for p in (sc, name if isinstance(name, str) else "") if p)
                outs, out_org = self.run(
                    inner[0], inner[1], invals, in_org, scope=sub, backward=bwd, frames=fr
                )
            else:
                outs = _bind(eqn, invals)
                if not eqn.primitive.multiple_results:
                    outs = [outs]
                rec = Record(
                    primitive=eqn.primitive.name,
                    scope=sc,
                    backward=bwd,
                    frames=fr,
                    params=tuple(
                        self.leaf_paths[o[1]]
                        for o in in_org
                        if o is not None and o[0] == "leaf" and self.leaf_paths[o[1]] is not None
                    ),
                    producers=tuple(o[1] for o in in_org if o is not None and o[0] == "rec"),
                )
                r_id = len(self.records)
                self.records.append(rec)
                out_org = [("rec", r_id, k) for k in range(len(outs))]
                for k, (v, x) in enumerate(zip(eqn.outvars, outs, strict=True)):
                    if _is_float(v.aval) and type(v).__name__ != "DropVar":
                        self.outputs.append((r_id, k, v))
                        self.values.append(x)
            for v, x, o in zip(eqn.outvars, outs, out_org, strict=True):
                env[v] = x
                if o is not None:
                    org[v] = o
        out_org = [None if isinstance(v, Literal) else org.get(v) for v in jaxpr.outvars]
        return [read(v) for v in jaxpr.outvars], out_org


def _arg_names(fn, n: int) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(n):
        if i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(params[i].name)
        else:
            names.append(f"args[{i}]")
    return names


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _split_modules(args):
    """Splits Flax NNX modules among ``args`` into (graphdef, state) for differentiation."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return list(args), [None] * len(args), []
    out, defs, modules = [], [], []
    for a in args:
        if isinstance(a, nnx.Module):
            graphdef, state = nnx.split(a)
            out.append(state)
            defs.append(graphdef)
            modules.extend((tuple(p), type(m)) for p, m in nnx.iter_modules(a))
        else:
            out.append(a)
            defs.append(None)
    return out, defs, modules


def track_scales(fn, *args, stats_on_device: bool = False) -> ScaleReport:
    """Scale statistics of every tensor in the forward and backward pass of ``fn``.

    ``fn(*args)`` must return a real scalar (a loss). The backward pass is its gradient with
    respect to every floating-point leaf of ``args`` (integer leaves are held fixed). A Flax
    NNX module may be passed directly as an argument: it is split with ``nnx.split`` and
    its parameters become differentiated inputs named by their paths (``"fc1/kernel"``).

    For every floating-point tensor -- the input leaves, each op's output in the forward
    pass, each op's output in the backward pass -- the report gives the name, phase,
    primitive, shape, dtype and

    .. math:: \\mathrm{log2\\_rms} = \\log_2 \\sqrt{\\tfrac1{n_f}\\textstyle\\sum x_i^2},\\quad
              \\mathrm{log2\\_amax} = \\log_2 \\max |x_i|

    over the ``n_f`` finite entries, plus the count of inf/NaN entries (so a non-finite
    value shows up as a count and a ``"nonfinite"`` flag, and never turns the statistics
    of the remaining entries into NaN).

    Memory and time: the jitted evaluation of the forward and backward pass returns every
    intermediate and the statistics are computed on the host in float64 (quick to compile;
    holds all intermediates in host memory once). With ``stats_on_device=True`` each tensor
    is reduced to its statistics (float32, float64 for float64 tensors) inside the jitted
    evaluation, so only three numbers per tensor leave the device (for large models;
    compiling takes longer).

    Naming: see :mod:`jaxq.analysis.naming` -- ``jax.named_scope`` / ``jax.named_call`` /
    jitted-function names from the JAX name stack, and NNX module paths recovered from the
    tracebacks JAX stores with each op.

    Args:
        fn: a function of ``args`` returning a real scalar.
        *args: its arguments: arrays, pytrees of arrays, Flax NNX modules.
        stats_on_device: reduce tensors to statistics on the device (see above).

    Returns:
        A :class:`jaxq.analysis.ScaleReport`.

    Raises:
        TypeError: if ``fn`` is not callable or nothing in ``args`` is floating point.
        ValueError: if ``fn`` does not return a real scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxq.analysis import track_scales
        >>> def loss(w, x):
        ...     with jax.named_scope("layer"):
        ...         y = x @ w
        ...     return jnp.mean(y ** 2)
        >>> rep = track_scales(loss, jnp.ones((4, 2)), jnp.ones((3, 4)))
        >>> rep.forward[0].name, rep.forward[0].log2_rms
        ('layer/dot_general', 2.0)
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn)!r}")
    names = _arg_names(fn, len(args))
    flat_args, graphdefs, modules = _split_modules(args)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(flat_args)
    leaves = [leaf for _, leaf in leaves_with_path]

    diff, leaf_names, leaf_paths = [], [], []
    for i, (path, leaf) in enumerate(leaves_with_path):
        arg_i = path[0].idx
        dt = getattr(leaf, "dtype", None)
        if isinstance(leaf, float):
            dt = np.dtype(np.float32)
        if dt is not None and jnp.issubdtype(dt, jnp.inexact):
            diff.append(i)
        rest = [_key_str(k) for k in path[1:]]
        if graphdefs[arg_i] is not None:
            if rest and rest[-1] in ("value", "raw_value"):
                rest = rest[:-1]
            mod_path = tuple(int(c) if c.isdigit() else c for c in rest[:-1])
            leaf_names.append("/".join(rest))
            leaf_paths.append(mod_path)
        else:
            leaf_names.append(names[arg_i] + jax.tree_util.keystr(tuple(path[1:])))
            leaf_paths.append(None)
    if not diff:
        raise TypeError("args must contain at least one floating-point array to differentiate")

    def rebuild(diff_vals):
        vals = list(leaves)
        for i, v in zip(diff, diff_vals, strict=True):
            vals[i] = v
        rebuilt = jax.tree_util.tree_unflatten(treedef, vals)
        out = []
        for a, g in zip(rebuilt, graphdefs, strict=True):
            if g is None:
                out.append(a)
            else:
                from flax import nnx

                out.append(nnx.merge(g, a))
        return out

    def loss_of(*diff_vals):
        return fn(*rebuild(diff_vals))

    diff_vals = [jnp.asarray(leaves[i]) for i in diff]
    out = jax.eval_shape(loss_of, *diff_vals)
    if not (
        isinstance(out, jax.ShapeDtypeStruct)
        and out.shape == ()
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise ValueError(
            "fn must return a real floating-point scalar (a loss); got "
            f"{jax.tree_util.tree_map(lambda s: f'{s.dtype}{list(s.shape)}', out)}"
        )
    closed = jax.make_jaxpr(jax.value_and_grad(loss_of, argnums=tuple(range(len(diff)))))(
        *diff_vals
    )
    walker = _Walker([leaf_paths[i] for i in diff])

    def evaluate(*xs):
        _, walker.out_org = walker.run(
            closed.jaxpr,
            closed.consts,
            list(xs),
            [("leaf", j) for j in range(len(xs))],
            scope="",
            backward=False,
        )
        alls = list(xs) + walker.values
        if not stats_on_device:
            return alls
        stats = [_stats(x) for x in alls]
        return jnp.stack([s for s, _ in stats]), jnp.stack([n for _, n in stats])

    if stats_on_device:
        log2s, bad = jax.jit(evaluate)(*diff_vals)
        log2s, bad = np.asarray(log2s, np.float64), np.asarray(bad)
    else:
        host = [_host_stats(np.asarray(v)) for v in jax.jit(evaluate)(*diff_vals)]
        log2s = np.asarray([h[0] for h in host], np.float64).reshape(-1, 2)
        bad = np.asarray([h[1] for h in host], np.int64)

    resolve_modules(walker.records, ModuleIndex(modules))

    # Which record produced each returned gradient.
    grad_of: dict[tuple[int, int], str] = {}
    for j, o in enumerate(walker.out_org[1:]):
        if o is not None and o[0] == "rec":
            grad_of.setdefault(o[1:], leaf_names[diff[j]])

    entries = []
    for j, i in enumerate(diff):
        x = diff_vals[j]
        entries.append(
            TensorScale(
                index=len(entries),
                name=leaf_names[i],
                phase="input",
                primitive="input",
                shape=tuple(x.shape),
                dtype=str(x.dtype),
                log2_rms=float(log2s[j, 0]),
                log2_amax=float(log2s[j, 1]),
                nonfinite=int(bad[j]),
                module="/".join(map(str, leaf_paths[i])) if leaf_paths[i] is not None else None,
            )
        )
    for k, (r_id, out_i, var) in enumerate(walker.outputs):
        rec = walker.records[r_id]
        row = len(diff) + k
        g = grad_of.get((r_id, out_i))
        name = "/".join(p for p in (rec.module or "", rec.scope, rec.primitive) if p)
        entries.append(
            TensorScale(
                index=len(entries),
                name=name,
                phase="backward" if rec.backward else "forward",
                primitive=rec.primitive,
                shape=tuple(var.aval.shape),
                dtype=str(var.aval.dtype),
                log2_rms=float(log2s[row, 0]),
                log2_amax=float(log2s[row, 1]),
                nonfinite=int(bad[row]),
                module=rec.module,
                scope=rec.scope,
                source=_user_source(rec.frames),
                grad_of=g,
            )
        )
    return ScaleReport(tuple(entries))
