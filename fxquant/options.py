"""The options of one prepare / convert, as one frozen typed object.

The API builds a :class:`QuantOptions` once (the backend resolved there, "auto" included), the
passes read its attributes through ``ctx.options``, and the prepared model keeps it in
``gm.meta[OPTIONS_KEY]`` for convert. A pickle keeps the backend by name (its rule tables may
hold functions that do not pickle); the name is looked up again only when a pass asks for it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from fxquant.errors import FxQuantError

if TYPE_CHECKING:
    from fxquant.backends.base import Backend
    from fxquant.qconfig import QConfigMapping
    from fxquant.trace import TraceConfig

OPTIONS_KEY = "fxquant_options"  # gm.meta key of a prepared (or converted) unit's options

# keys of the options dict of earlier versions that carry nothing any more
_RETIRED_KEYS = frozenset({"example_inputs", "stored_backend"})


@dataclass(frozen=True)
class QuantOptions:
    """What the API was called with, for the passes.

    ``backend_name``: the backend's registered name (what a pickle keeps); ``backend`` is the
    :class:`~fxquant.backends.base.Backend` itself. ``is_qat``: None means "as the model's
    train/eval mode" (what ``fuse`` keys BatchNorm folding on). ``observer_factory_wrapper``
    wraps each observer factory (QAT: fake quantization). ``trace_config``: the leaf rules the
    unit was traced with. ``range_check``: convert's mode (:mod:`fxquant.range_check`).
    ``bias``: convert's bias mode, "float" or "int32" (:func:`fxquant.convert_fx`).
    ``fuse_sums``: convert fuses conv + residual add (+ ReLU), rounded once
    (:mod:`fxquant.passes.fuse_sums`). ``fuse_activations``: convert fuses conv + SiLU /
    hardswish, rounded once (:mod:`fxquant.passes.fuse_activations`).
    """

    qconfig_mapping: Optional[QConfigMapping] = None
    backend_name: Optional[str] = None
    is_qat: Optional[bool] = None
    observer_factory_wrapper: Optional[Callable[[Any], Any]] = None
    trace_config: Optional[TraceConfig] = None
    range_check: str = "fix"
    bias: str = "float"
    fuse_sums: bool = False
    fuse_activations: bool = False
    resolved_backend: Optional[Backend] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        b = self.resolved_backend
        if b is not None and b.name != self.backend_name:
            raise FxQuantError(f"QuantOptions: backend_name {self.backend_name!r} is not the "
                               f"given backend {b.name!r}",
                               hint="build it with QuantOptions.build(backend=...)")

    @classmethod
    def build(cls, backend: Union[str, Backend, None] = None, **values: Any) -> QuantOptions:
        """Options holding ``backend`` resolved: a registered name, ``"auto"`` (this CPU's
        default), a :class:`Backend` object, or None (passes that need one take "auto")."""
        if backend is None:
            return cls(**values)
        from fxquant.backends.registry import get_backend

        resolved = get_backend(backend)
        return cls(backend_name=resolved.name, resolved_backend=resolved, **values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QuantOptions:
        """From the options dict of earlier versions (a prepared model pickled by them, a
        ``PassContext(options={...})``): the same keys, ``"backend"`` a name or a Backend."""
        names = {f.name for f in fields(cls)} - {"resolved_backend", "backend_name"}
        unknown = sorted(set(values) - names - _RETIRED_KEYS - {"backend"})
        if unknown:
            raise FxQuantError(f"unknown option(s) {unknown}",
                               hint=f"QuantOptions takes {sorted(names | {'backend'})}")
        kept = {k: v for k, v in values.items() if k in names}
        backend = values.get("backend")
        if isinstance(backend, str) or backend is None:  # looked up when a pass asks
            return cls(backend_name=backend, **kept)
        return cls.build(backend, **kept)

    @property
    def backend(self) -> Backend:
        """The Backend; looked up by name (once) only where a pickle or a user's options
        gave the name alone; "auto" where no backend was given."""
        if self.resolved_backend is None:
            from fxquant.backends.registry import get_backend
            from fxquant.backends.names import AUTO

            object.__setattr__(self, "resolved_backend", get_backend(self.backend_name or AUTO))
        assert self.resolved_backend is not None
        return self.resolved_backend

    def require_mapping(self, pass_name: str) -> QConfigMapping:
        """The QConfigMapping, or an error naming the pass that needs it."""
        if self.qconfig_mapping is None:
            raise FxQuantError(f"option 'qconfig_mapping' is needed by pass '{pass_name}' but "
                               f"was not given",
                               hint="pass qconfig_mapping=... in QuantOptions(...)")
        return self.qconfig_mapping

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "resolved_backend": None}  # kept by name: see module doc

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantOptions:
        """A deep copy that shares the Backend (immutable tables, maybe not registered)."""
        values = {f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)
                  if f.name != "resolved_backend"}
        return QuantOptions(**values, resolved_backend=self.resolved_backend)


def options_of(model: Any) -> Optional[QuantOptions]:
    """The options a prepared or converted unit keeps in its ``meta``; None if it has none. An
    options dict (a model pickled by an earlier version) is read as :meth:`from_dict`."""
    opts = getattr(model, "meta", {}).get(OPTIONS_KEY)
    if opts is None or isinstance(opts, QuantOptions):
        return opts
    return QuantOptions.from_dict(opts)
