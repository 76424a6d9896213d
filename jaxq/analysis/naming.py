"""Names for jaxpr equations: JAX name stacks and Flax NNX module paths.

Two sources of names are combined.

1. **The JAX name stack** (``eqn.source_info.name_stack``): every ``jax.named_scope`` /
   ``jax.named_call`` the op was traced under, the names of jitted functions it was traced
   in, and (Flax Linen, ``flax_profile`` on by default) Linen module names. JAX wraps the
   stack in ``jvp(..)`` / ``transpose(..)`` markers under differentiation; they are
   stripped, and ``transpose(`` is what marks an op as part of the backward pass.

2. **Flax NNX module paths.** NNX does not push module names onto the name stack, so
   they are recovered from the Python traceback JAX stores with every equation
   (``eqn.source_info.traceback``; transposed equations keep the traceback of the forward
   op they came from). A frame whose function is a method of a module class found in the
   model (``Linear.__call__``) marks a module *invocation*, identified by the chain of
   frames (with bytecode offsets) up to that method. An invocation is then given a path from
   the parameters it reads: an op that reads a parameter at ``fc1/kernel`` inside
   ``Linear.__call__`` belongs to the nearest module on that path that is a ``Linear``
   (``fc1``); a module with no parameters of its own takes the common parent of its
   children's paths; a parameter-free module class with a single instance in the model
   takes that instance's path. When one call site runs several modules (a Python loop over
   ``self.layers``), ops that read a parameter keep their exact path, ops fed only by such
   ops in the same invocation inherit it, and the rest get the paths' common pattern with
   ``*`` in place of the differing component (``layers/*``).

Everything here is host-side bookkeeping over an already-traced jaxpr; nothing is patched.
"""

from __future__ import annotations

import dataclasses
import os
import re

__all__ = ["clean_scope", "ModuleIndex", "Record", "resolve_modules"]

_MARKERS = re.compile(r"\b(?:jvp|transpose|vmap|remat|checkpoint|linearize|vjp)\(([^()]*)\)")


def clean_scope(name_stack: str) -> str:
    """Strips JAX's transform markers from a name stack string.

    Example:
        >>> clean_scope("transpose(jvp(block/attn))")
        'block/attn'
    """
    prev = None
    s = name_stack
    while s != prev:
        prev, s = s, _MARKERS.sub(r"\1", s)
    return "/".join(p for p in s.split("/") if p)


@dataclasses.dataclass
class Record:
    """Host-side facts about one traced equation (shared by all its outputs)."""

    primitive: str
    scope: str
    backward: bool
    frames: tuple  # (file, function qualname, line, bytecode offset), outermost first
    params: tuple[tuple, ...]  # module paths of input leaves read directly
    producers: tuple[int, ...]  # record ids of the equations producing its inputs
    module: str | None = None


class ModuleIndex:
    """The modules of the NNX arguments: path -> module class, and class lookup by frame."""

    def __init__(self, modules: list[tuple[tuple, type]]):
        self.types: dict[tuple, type] = {}
        for path, cls in modules:
            self.types.setdefault(tuple(path), cls)
        self._by_qualname: dict[str, list[tuple[type, str | None]]] = {}
        base_names = {"Module", "Object", "Pytree"}
        for cls in set(self.types.values()):
            for k in cls.__mro__:
                if k.__module__.startswith("flax.nnx") and k.__name__ in base_names:
                    continue
                if k is object:
                    continue
                entry = (k, _class_file(k))
                lst = self._by_qualname.setdefault(k.__qualname__, [])
                if entry not in lst:
                    lst.append(entry)

    def __bool__(self) -> bool:
        return bool(self.types)

    def frame_class(self, file: str, function: str) -> type | None:
        """The module class whose method ``function`` (a qualname) is, if any."""
        fn = function.split(".<locals>.")[0]
        if "." not in fn:
            return None
        owner = fn.rsplit(".", 1)[0]
        cands = self._by_qualname.get(owner)
        if not cands:
            return None
        real = os.path.realpath(file)
        for k, f in cands:
            if f is not None and f == real:
                return k
        return cands[0][0] if len(cands) == 1 and cands[0][1] is None else None

    def nearest(self, path: tuple, cls: type, *, strict: bool = False) -> tuple | None:
        """The nearest ancestor (or ``path`` itself unless ``strict``) that is a ``cls``."""
        start = len(path) - 1 if strict else len(path)
        for n in range(start, -1, -1):
            t = self.types.get(tuple(path[:n]))
            if t is not None and issubclass(t, cls):
                return tuple(path[:n])
        return None

    def unique_instance(self, cls: type) -> tuple | None:
        hits = [p for p, t in self.types.items() if issubclass(t, cls)]
        return hits[0] if len(hits) == 1 else None


def _class_file(k: type) -> str | None:
    import inspect

    try:
        return os.path.realpath(inspect.getfile(k))
    except (TypeError, OSError):
        return None


def _chain(frames: tuple, index: ModuleIndex) -> list[tuple[tuple, type]]:
    """The nested module invocations of a frame stack, outermost first, as (key, class).

    An invocation's key is every frame up to its method's frame as (file, qualname,
    bytecode offset) -- the offset tells apart two calls on one line -- plus the method's
    (file, qualname) without an offset (the offset moves within the method).
    """
    out = []
    for i, (f, fn, _, _) in enumerate(frames):
        cls = index.frame_class(f, fn)
        if cls is not None:
            outer = tuple((a, b, off) for a, b, _, off in frames[:i])
            out.append((outer + ((f, fn),), cls))
    return out


def _render(paths: set[tuple]) -> str:
    if len(paths) == 1:
        return "/".join(str(c) for c in next(iter(paths)))
    ps = sorted(paths, key=lambda p: tuple(map(str, p)))
    n = min(len(p) for p in ps)
    out = []
    for i in range(n):
        comps = {p[i] for p in ps}
        out.append(str(ps[0][i]) if len(comps) == 1 else "*")
    if any(len(p) > n for p in ps):
        out.append("*")
    return "/".join(out)


def _is_ancestor(a: tuple, c: tuple) -> bool:
    """Whether invocation key ``a`` encloses invocation key ``c``."""
    n = len(a)
    return n < len(c) and c[: n - 1] == a[:-1] and c[n - 1][:2] == a[-1]


def _line(r: Record, key: tuple) -> int:
    """Bytecode offset of ``r`` within the innermost method of invocation ``key``."""
    return r.frames[len(key) - 1][3]


def _inherit(records, keys, exact, p: int, r: int, cls: type, index: ModuleIndex):
    """The path record ``r`` (class ``cls``) inherits from its resolved producer ``p``."""
    kp, kr = keys[p], keys[r]
    if kp is None:
        return None
    if kp == kr:
        # Same call site: accept only a producer that can be from the same invocation,
        # judged by the code order within the method (forward data flows down the method,
        # cotangents flow up it).
        lp, lr = _line(records[p], kp), _line(records[r], kr)
        ok = lp >= lr if (records[p].backward and records[r].backward) else lp <= lr
        return exact[p] if ok else None
    if _is_ancestor(kr, kp):  # a child's output
        return index.nearest(exact[p], cls, strict=True)
    if _is_ancestor(kp, kr):  # fed by the enclosing module: the unique ``cls`` inside it
        lp, call = _line(records[p], kp), kr[len(kp) - 1][2]
        if not (lp >= call if records[p].backward and records[r].backward else lp <= call):
            return None
        inside = [
            q
            for q, t in index.types.items()
            if q[: len(exact[p])] == exact[p] and len(q) > len(exact[p]) and issubclass(t, cls)
        ]
        return inside[0] if len(inside) == 1 else None
    return None


def resolve_modules(records: list[Record], index: ModuleIndex) -> None:
    """Fills ``record.module`` for every record (see the module docstring)."""
    if not index:
        return
    keys: dict[int, tuple | None] = {}
    parents: dict[tuple, tuple | None] = {}
    classes: dict[tuple, type] = {}
    for r_id, r in enumerate(records):
        chain = _chain(r.frames, index)
        keys[r_id] = chain[-1][0] if chain else None
        for k, (key, cls) in enumerate(chain):
            classes[key] = cls
            parents[key] = chain[k - 1][0] if k else None
    direct: dict[int, set[tuple]] = {}
    cands: dict[tuple, set[tuple]] = {k: set() for k in parents}
    for r_id, r in enumerate(records):
        key = keys[r_id]
        if key is None:
            continue
        d = {index.nearest(p, classes[key]) for p in r.params}
        d.discard(None)
        direct[r_id] = d
        cands[key] |= d
    # Bottom-up: a parent invocation is the nearest enclosing module of its children's.
    for key in sorted(parents, key=len, reverse=True):
        if not cands[key]:
            u = index.unique_instance(classes[key]) if classes[key] is not None else None
            if u is not None:
                cands[key].add(u)
        par = parents[key]
        if par is not None and classes.get(par) is not None:
            for p in cands[key]:
                a = index.nearest(p, classes[par], strict=True)
                if a is not None:
                    cands[par].add(a)
    exact: dict[int, tuple] = {}
    for r_id, r in enumerate(records):
        key = keys[r_id]
        if key is None:
            continue
        d = direct.get(r_id, set())
        if len(d) == 1:
            exact[r_id] = next(iter(d))
        elif len(cands[key]) == 1:
            exact[r_id] = next(iter(cands[key]))
        else:
            # Inherit from producers that can be in the same invocation; when they disagree
            # (e.g. a residual add reading the previous loop iteration's output) the
            # differing path components become ``*``.
            fed = set()
            for p in r.producers:
                if p in exact:
                    fed.add(_inherit(records, keys, exact, p, r_id, classes[key], index))
            fed.discard(None)
            if len(fed) == 1:
                exact[r_id] = next(iter(fed))
            elif fed:
                r.module = _render(fed)
                continue
        if r_id in exact:
            r.module = _render({exact[r_id]})
        elif cands[key]:
            r.module = _render(cands[key])
        else:
            cls = classes[key]
            r.module = f"[{cls.__name__}]" if cls is not None else None
