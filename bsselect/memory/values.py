"""Real values where the simulated step reads them.

Fake tensors have shapes but no values, so a model that branches on its input's values
(``if attention_mask.all()``, ``lengths.cpu()`` for ``pack_padded_sequence``, ``.item()``, a
boolean mask's ``nonzero``) cannot run on them. Such values almost always come from the batch's
integer and boolean tensors (token ids, attention masks, sequence lengths), which the simulation
collates for real anyway, and from small tensors computed from those alone. So:

- the batch's integer and boolean tensors stay real (``keep_real``): their bytes are the
  batch's real bytes, counted like any other storage;
- ``RealWhereKnown``, a dispatch mode under the live-storage counter and above the fake mode,
  runs every op whose tensor inputs are all real (or that has none: ``arange``, ``ones``)
  *for real* when its result is small
  (``REAL_RESULT_MAX_BYTES``), so that values derived from the batch stay real as far as the
  model takes them; larger results (a (b, 1, T, T) mask built from the attention mask) are
  fake, as before, and never allocated;
- ops whose output shapes depend on real inputs but whose data is an activation get their
  shapes from the real values: the two packed-sequence ops exactly
  (``_pack_padded_sequence``, ``_pad_packed_sequence``), others (``h[mask]``) by running
  them on stand-ins for the fake inputs (``_shapes_from_real_inputs``).

A real tensor an op writes into from fake ones keeps its old values: it is marked unknown
(``RealWhereKnown.kind``), as is what real ops compute from it; one a random op draws into is
marked drawn (a typical draw for a mask; a branch on it is the draw's luck). The reads that
bypass dispatch (``.tolist()``, ``np.asarray``, ``torch.tensor(list(t))``) are checked too
(``values_where_known``).

An op that still needs a value nobody has (``.item()`` on an activation or an unknown tensor)
fails with a line that names the op and says what to do (``DataDependentOp``).
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

REAL_RESULT_MAX_BYTES = 16 * 2**20  # an op on real inputs runs for real below this output size
RANDOM_SEED = 0  # a random op writing into a real tensor draws from a generator of its own

aten = torch.ops.aten


class DataDependentOp(RuntimeError):
    """The simulated step needed the values of a tensor computed from the model's weights
    (or the batch's floating-point tensors, which the simulation holds as fake ones).
    ``what``: what the step did, in a few words."""

    def __init__(self, message: str, what: str = "") -> None:
        super().__init__(message)
        self.what = what


class IndexOutOfRange(IndexError):
    """A lookup the real step would fail on too: an embedding row past the table's end (a
    token id beyond the vocabulary, a position beyond the model's positions). Fake tensors do
    not check indices, so the simulation checks the real ones it has. ``rows``: the table's;
    ``index``: the one looked up."""

    def __init__(self, message: str, rows: int = 0, index: int = 0) -> None:
        super().__init__(message)
        self.rows, self.index = rows, index


def check_embedding(weight: Any, indices: Any) -> None:
    """Raise IndexOutOfRange when real ``indices`` fall outside ``weight``'s rows, as
    ``torch.embedding`` does on real tensors ("index out of range in self")."""
    if not isinstance(indices, torch.Tensor) or is_fake(indices) or not indices.numel():
        return
    with really():
        lo, hi = int(indices.min()), int(indices.max())
    rows = int(weight.shape[0])
    if lo < 0 or hi >= rows:
        at = hi if hi >= rows else lo
        raise IndexOutOfRange(
            f"index out of range: an embedding of {rows:,} rows was looked up at index {at:,}, "
            "which a real step fails on too (a sequence longer than the model's positions, "
            "e.g. --seq-len, or a token id beyond its vocabulary?)", rows, at)


@contextmanager
def really() -> Iterator[None]:
    """Inside, ops run on the CPU for real: every dispatch mode is off, the fake mode too."""
    with unset_fake_temporarily(), _disable_current_modes():
        yield


def is_fake(t: Any) -> bool:
    return isinstance(t, FakeTensor)


def keep_real(t: torch.Tensor) -> bool:
    """Whether a batch tensor stays real in the simulation: integer and boolean tensors (ids,
    masks, lengths) whose bytes are within reach; floating inputs become fake."""
    return (not t.is_floating_point() and not t.is_complex()
            and t.numel() * t.element_size() <= 64 * REAL_RESULT_MAX_BYTES)


def _nbytes(outputs: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(outputs)[0]
               if isinstance(t, torch.Tensor))


def _real_lengths(lengths: Any) -> torch.Tensor | None:
    if isinstance(lengths, torch.Tensor) and not is_fake(lengths):
        with really():
            return lengths.to("cpu", torch.int64)
    return None


def _pack_padded_sequence(input: torch.Tensor, lengths: Any, batch_first: bool) -> Any:
    """aten._pack_padded_sequence on a fake ``input`` with real ``lengths``: data
    (sum(lengths), *features) fake, batch_sizes real, as the CPU kernel makes them."""
    real = _real_lengths(lengths)
    if real is None:
        return NotImplemented
    with really():
        stand_in = torch.zeros(input.shape[:2], dtype=torch.int8)  # (B, T) or (T, B)
        data, batch_sizes = aten._pack_padded_sequence(stand_in, real, batch_first)
    features = tuple(input.shape[2:])
    out = torch.empty((data.shape[0], *features), dtype=input.dtype)  # fake (under fake_mode)
    return out, batch_sizes


def _pad_packed_sequence(data: torch.Tensor, batch_sizes: Any, batch_first: bool,
                         padding_value: float, total_length: int) -> Any:
    real = _real_lengths(batch_sizes)
    if real is None:
        return NotImplemented
    with really():
        stand_in = torch.zeros((data.shape[0], 1), dtype=torch.int8)
        padded, lengths = aten._pad_packed_sequence(stand_in, real, batch_first, 0,
                                                    total_length)
    shape = tuple(padded.shape[:2]) + tuple(data.shape[1:])
    return torch.empty(shape, dtype=data.dtype), lengths


def _grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Any = None, bias: Any = None,
                out_dtype: torch.dtype | None = None) -> Any:
    """aten._grouped_mm (mixture-of-experts layers: every routed token through its expert in
    one call) on fake inputs. Its meta kernel accepts bf16 only, the CUDA fast path's rule;
    the CPU kernel and CUDA's fallback (a loop of matmuls into one output) take fp32 too, and
    transformers passes its fp32 experts under bf16 autocast. The output's shape follows from
    the inputs' shapes (the tokens per expert, in ``offs``, only split its rows)."""
    if not (is_fake(mat_a) or is_fake(mat_b)) or offs is None and mat_a.dim() != mat_b.dim():
        return NotImplemented
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        shape = (offs.shape[0], mat_a.shape[0], mat_b.shape[1])
    elif mat_a.dim() == 2:
        shape = (mat_a.shape[0], mat_b.shape[-1])
    elif mat_b.dim() == 2:
        shape = (mat_a.shape[1], mat_b.shape[1])
    else:
        shape = (mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1])
    return torch.empty(shape, dtype=out_dtype or mat_a.dtype)  # fake (under fake_mode)


# Ops whose output shapes follow from real arguments while their data is an activation.
# The ops whose output shapes the batch's real values decided in the simulated steps since
# the last ``clear_value_shaped`` (validate_task clears it): the memory then depends on
# those values, not only on the items' sizes (``inputs.scan_inputs`` ranks by them).
_VALUE_SHAPED: dict[str, None] = {}


_VALUE_READS: list[bool] = [False]  # a batch value read (``.item()``) since the last clear


def clear_value_shaped() -> None:
    _VALUE_SHAPED.clear()
    _VALUE_READS[0] = False


def reads_batch_values() -> bool:
    """Whether the simulated steps since the last ``clear_value_shaped`` read a value of the
    batch into Python (``int(mask.sum(1).max())``, ``if mask.all():``): a branch, or a length
    that later shapes follow (trimming the padding); ``inputs.scan_inputs`` then judges the
    orderings of the items by the simulated step."""
    return _VALUE_READS[0]


def value_shaped_ops() -> tuple[str, ...]:
    """``aten`` names of the ops whose output shapes came from the batch's values."""
    return tuple(_VALUE_SHAPED)


def _value_shaped(func: Any) -> None:
    # A value read (``.item()``, ``if mask.all():``) is a branch, which can go either way (a
    # batch without padding skips a causal mask and needs less); only an output's shape
    # grows with the real values it keeps.
    if func is not aten._local_scalar_dense.default:
        _VALUE_SHAPED[getattr(func, "__name__", str(func)).removesuffix(".default")] = None
    else:
        _VALUE_READS[0] = True


_SHAPE_FROM_REAL_ARGS = {
    aten._pack_padded_sequence.default: _pack_padded_sequence,
    aten._pad_packed_sequence.default: _pad_packed_sequence,
}


class RealWhereKnown(TorchDispatchMode):
    """Runs ops on all-real inputs for real when their result is small (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        # The first op on real inputs whose result was left fake for its size (op, bytes):
        # what follows from it has no values, whatever it was computed from.
        self.capped: tuple[str, int] | None = None
        # Fake tensors drawn at random (``torch.rand(())``) or computed from such draws
        # alone: a value read of one is a random branch (LayerDrop), said as such.
        from torch.utils.weak import WeakTensorKeyDictionary

        self.drawn = WeakTensorKeyDictionary()
        # Storages of real tensors whose values are not the step's, by kind: WRITTEN from
        # fake ones (``buf.copy_(logits.argmax(-1))``, FSDP2's all-gather into a small
        # parameter's buffer), which keep stale values a read took for the step's own
        # (review: ``int(buf.max())`` gave 0); DRAWN in place by a random op (a draw of the
        # simulation's own: typical as a mask, but a branch on it, LayerDrop's
        # ``torch.empty(()).uniform_() < p``, went one way for every layer: 40-57% low). By
        # the storage's id while it lives, so views taken before the write are covered too.
        self.unknown: dict[int, tuple[Any, str]] = {}
        # The last refusal raised to the step's code: where that code wraps it (TorchScript's
        # interpreter re-raises it as a RuntimeError) or swallows it, the step's failure is
        # still the simulation's, and this says why.
        self.refused: DataDependentOp | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        try:
            return self._torch_dispatch(func, args, kwargs or {})
        except DataDependentOp as exc:
            self.refused = exc
            raise

    def _torch_dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        kinds = {self.kind(t) for t in tensors} - {None} if self.unknown else set()
        unknown = WRITTEN in kinds
        if kinds and (func is aten._local_scalar_dense.default
                      or unknown and func in _SHAPE_FROM_REAL_ARGS):
            # (a read has one input, so one kind; the shape ops refuse unknown ones only)
            raise _refusal(_what(func), WRITTEN if unknown else DRAWN)
        out = self._dispatch(func, args, kwargs, tensors, unknown)
        if kinds:  # what a real run computes from such values is such too
            for t in tree_flatten(out)[0]:
                self._mark(t, WRITTEN if unknown else DRAWN)
        seeded = torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
        if func._schema.is_mutable:
            self._note_writes(func, args, kwargs, tensors, unknown, seeded)
        if not (seeded or self.drawn):
            return out  # the common case, kept cheap: nothing drawn yet
        if self._from_draws(tensors, seeded):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and is_fake(t):
                    self.drawn[t] = True
        return out

    def kind(self, t: Any) -> str | None:
        """WRITTEN or DRAWN for a real tensor whose values are not the step's, else None."""
        if (not isinstance(t, torch.Tensor) or is_fake(t) or not self.unknown
                or t.layout is not torch.strided):  # (a sparse tensor has no storage)
            return None
        entry = self.unknown.get(id(t.untyped_storage()))
        return entry[1] if entry else None

    def _mark(self, t: Any, kind: str) -> None:
        if not isinstance(t, torch.Tensor) or is_fake(t):
            return
        if t.layout is not torch.strided:  # no storage to mark it by
            raise _refusal("the step makes a sparse tensor from a tensor", kind)
        st = t.untyped_storage()
        key = id(st)
        if key not in self.unknown:
            ref = weakref.ref(st, lambda _, key=key: self.unknown.pop(key, None))
        elif self.unknown[key][1] == WRITTEN:
            return  # stale values stay stale
        else:
            ref = self.unknown[key][0]
        self.unknown[key] = (ref, kind)

    def _note_writes(self, func: Any, args: tuple, kwargs: dict, tensors: list,
                     unknown: bool, seeded: bool) -> None:
        """An op that writes into real tensors from fake (or unknown) ones leaves their
        values unknown; a random op writing into real ones alone leaves them drawn."""
        fakes = sum(is_fake(t) for t in tensors)
        if fakes == len(tensors) or not (unknown or fakes or seeded):
            return  # writes into fake tensors only, or real from real
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                for t in tree_flatten(value)[0]:
                    self._mark(t, WRITTEN if unknown or fakes else DRAWN)

    def _from_draws(self, tensors: list, seeded: bool = False) -> bool:
        """Whether an op on ``tensors`` computes from random draws alone: its fake inputs are
        all drawn, or it has none and draws itself (``seeded``)."""
        fakes = [t for t in tensors if is_fake(t)]
        return all(t in self.drawn for t in fakes) if fakes else seeded

    def _dispatch(self, func: Any, args: tuple, kwargs: dict, tensors: list,
                  unknown: bool = False) -> Any:
        """``unknown``: an input is a real tensor whose values are not the step's: an op
        whose output shape needs them fails as on a fake one (reads: ``__torch_dispatch__``)."""
        if func is aten.embedding.default and not unknown:
            check_embedding(args[0], args[1])
        if func is aten._grouped_mm.default:
            out = _grouped_mm(*args, **kwargs)
            if out is not NotImplemented:
                return out
        special = _SHAPE_FROM_REAL_ARGS.get(func)
        if special is not None:
            out = special(*args, **kwargs)
            if out is not NotImplemented:
                _value_shaped(func)
                return out
        all_real = not any(is_fake(t) for t in tensors)
        if not all_real and func in _VALUES_FROM_SHAPE:
            out = _values_from_shape(func, args, kwargs)
            if out is not NotImplemented:
                return out
        if tensors and all_real and func._schema.is_mutable and not _runs_for_real(func):
            # A random op writing into a real tensor (``keep = torch.zeros(s).bernoulli_(p)``,
            # word dropout): on the fake pass the tensor kept its old values, and a mask drawn
            # so selected no token at all, the memory far below the real step's (review). A
            # draw of its own (seeded, the caller's generator untouched) gives typical values.
            with really(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                return func(*args, **kwargs)
        if all_real and _runs_for_real(func):
            if func is aten._local_scalar_dense.default:
                # A value read (the optimizer's step count, ``.item()``): no tensor results,
                # and on fake tensors it raises, which costs more than the read.
                _value_shaped(func)
                with really():
                    return func(*args, **kwargs)
            if func._schema.is_mutable:
                # In place (``lengths -= 1``) or ``out=``: it writes into a real tensor and
                # allocates nothing. Run it once, for real: the shapes-only pass below would
                # write into the real tensor too, and the step saw the op applied twice (T5's
                # relative-position buckets past the table's end; a packed LSTM's lengths
                # short by one and its memory 15% low: review).
                with really():
                    return func(*args, **kwargs)
            # (Unknown values too: the meta kernel skips the ops whose shapes need values.)
            small = _meta_nbytes(func, args, kwargs, tensors)
            if small is not None and small <= REAL_RESULT_MAX_BYTES:
                with really():
                    out = func(*args, **kwargs)
                if _nbytes(out) <= REAL_RESULT_MAX_BYTES:  # the meta kernel was right
                    return out
            try:
                fake_out = func(*args, **kwargs)  # under the fake mode: shapes, no memory
            except Exception as exc:  # noqa: BLE001 - data-dependent shape: run it to learn it
                if _is_data_dependent(exc):
                    if unknown:
                        raise _refusal(_what(func), WRITTEN) from exc
                    _value_shaped(func)
                fake_out = None
            if fake_out is None or _nbytes(fake_out) <= REAL_RESULT_MAX_BYTES:
                with really():
                    return func(*args, **kwargs)
            if self.capped is None:
                self.capped = (f"aten.{_op_name(func)}", _nbytes(fake_out))
            return fake_out
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not _is_data_dependent(exc):
                raise
            if unknown:
                raise _refusal(_what(func), WRITTEN) from exc
            out = _shapes_from_real_inputs(func, args, kwargs)
            if out is NotImplemented:
                if self._from_draws(tensors):
                    raise _refusal(_what(func), DRAWN) from exc
                raise DataDependentOp(_advice(func, self.capped), _what(func)) from exc
            _value_shaped(func)
            return out


WRITTEN, DRAWN = "written", "drawn"  # RealWhereKnown.kind
# Tensor methods that read a tensor's data with no op a dispatch mode sees (``map_`` and
# ``map2_`` also their tensor arguments'; ``apply_`` and ``map_`` hand each value to a Python
# function); functions that do (``to_dlpack``, by owner); constructors and methods that copy
# the data of the tensors in a list (``torch.tensor(list(counts))``, ``x.new_tensor(...)``).
_HOST_READS = ("tolist", "numpy", "__array__", "__dlpack__", "apply_", "map_", "map2_")
_HOST_READ_FUNCTIONS = ((torch.utils.dlpack, "to_dlpack"), (torch, "to_dlpack"))
_COPYING_CONSTRUCTORS = ("tensor", "as_tensor", "asarray")
_COPYING_METHODS = ("new_tensor", "new")
# TorchScript's interpreter reads a tensor into a Python list with no dispatched op.
_SCRIPT_READS = ("prim::tolist",)


@contextmanager
def values_where_known() -> Iterator[RealWhereKnown]:
    """``RealWhereKnown``, with the reads that bypass dispatch failing on a tensor whose
    values it does not know (a fake tensor, or a real one marked unknown or drawn), as a
    value read of a fake tensor fails: the host reads above, ``f"{t:.4f}"`` of a scalar, and
    TorchScript functions and methods that read a tensor into a list. Unguarded, these read
    stale values (the answer silently low), or a fake tensor's missing data (``apply_``,
    ``__dlpack__``, TorchScript's ``tolist``: the process crashed), or failed with errors that
    blamed the task. They are patched for the duration, not caught by a function mode: those
    are not active in the backward (a hook's ``counts.tolist()``: review). Known gaps: a
    function taken before the step (``from torch import tensor``), the legacy constructors
    (``torch.LongTensor(list)``) and reads in another thread."""
    mode = RealWhereKnown()

    def guard(t: Any, what: str) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if is_fake(t):
            mode.refused = DataDependentOp(_weights_advice(what), what)
            raise mode.refused
        kind = mode.kind(t)
        if kind is not None:
            mode.refused = _refusal(what, kind)
            raise mode.refused

    def listed(data: Any) -> list:
        """The tensors in a list (one tensor alone is converted by ops the mode sees)."""
        return [] if isinstance(data, torch.Tensor) else tree_flatten(data)[0]

    def reader(name: str, original: Any) -> Any:
        @functools.wraps(original)
        def read(*args: Any, **kwargs: Any) -> Any:
            for t in args:
                guard(t, f"the step reads a tensor's values into Python (.{name}())")
            return original(*args, **kwargs)
        return read

    def copier(name: str, original: Any) -> Any:
        words = (f"torch.{name}(...)" if name in _COPYING_CONSTRUCTORS
                 else f"tensor.{name}(...)")

        @functools.wraps(original)
        def make(*args: Any, **kwargs: Any) -> Any:
            for data in args[name in _COPYING_METHODS:]:  # a method's self is not copied
                for t in listed(data):
                    guard(t, f"the step copies a tensor's values ({words})")
            return original(*args, **kwargs)
        return make

    def formatter(original: Any) -> Any:
        @functools.wraps(original)
        def format_(self: torch.Tensor, spec: str) -> str:
            if spec and self.dim() == 0:
                guard(self, f"the step formats a tensor's value (f\"{{t:{spec}}}\")")
            return original(self, spec)
        return format_

    reads_in_script: dict[int, bool] = {}

    def scripted(original: Any) -> Any:
        @functools.wraps(original)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            key = id(self)
            if key not in reads_in_script:
                graph = getattr(self, "inlined_graph", None) or self.graph
                reads_in_script[key] = any(graph.findAllNodes(k) for k in _SCRIPT_READS)
            if reads_in_script[key]:
                name = getattr(self, "qualified_name", None) or getattr(self, "name", "")
                for t in tree_flatten((args, kwargs))[0]:
                    guard(t, f"the TorchScript function {name} reads a tensor's values into "
                             "Python (.tolist())")
            return original(self, *args, **kwargs)
        return call

    saved = ([(torch.Tensor, n, reader) for n in _HOST_READS]
             + [(owner, n, reader) for owner, n in _HOST_READ_FUNCTIONS if hasattr(owner, n)]
             + [(torch, n, copier) for n in _COPYING_CONSTRUCTORS]
             + [(torch.Tensor, n, copier) for n in _COPYING_METHODS]
             + [(torch.Tensor, "__format__", lambda n, f: formatter(f))]
             + [(cls, "__call__", lambda n, f: scripted(f))
                for cls in (torch.jit.ScriptFunction, torch._C.ScriptMethod)])
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in saved]
    try:
        for (owner, name, wrap), (_, _, original) in zip(saved, originals):
            setattr(owner, name, wrap(name, original))
        with mode:
            yield mode
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


# Ops the fake mode refuses or shapes by their values (fake_impls: ``.item()``, ``nonzero``,
# ``unique``, ``h[mask]``, ...): their meta kernels may answer where the values decide.
_SHAPE_BY_VALUE_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


def _meta_nbytes(func: Any, args: tuple, kwargs: dict, tensors: list) -> int | None:
    """The bytes of an op's results on all-real ``tensors`` (at least one), from its meta
    kernel on data-free copies: the size test for running it for real without turning every
    input into a fake tensor (about a millisecond an op; on a 70B check over 512 ranks,
    mostly the optimizer's step counters, a fifth of its time). None where the meta kernel
    cannot say (it refuses, a device is named, an input is not strided), and for the ops
    whose shapes the fake mode reads from values: those take the fake path, as before."""
    if (not tensors or "device" in kwargs
            or any(tag in func.tags for tag in _SHAPE_BY_VALUE_TAGS)
            or any(t.layout is not torch.strided for t in tensors)):
        return None
    flat, spec = tree_flatten((args, kwargs))
    if any(isinstance(x, torch.device) for x in flat):
        return None
    try:
        with really():
            meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                    if isinstance(t, torch.Tensor) else t for t in flat]
            a, k = tree_unflatten(meta, spec)
            out = func(*a, **k)
    except Exception:  # noqa: BLE001 - no meta kernel, or one that needs more: the fake path
        return None
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if any(t.device.type != "meta" or t.layout is not torch.strided for t in outs):
        return None
    return _nbytes(outs)


# Ops whose values never depend on their tensor input's values, only on its shape:
# ``torch.ones_like(input_values, dtype=torch.long)`` is the attention mask wav2vec2's CTC
# head builds when the batch has none, and its lengths decide the CTC loss's shapes; left
# fake, the step failed as data-dependent (review). Each op's fill value, from its arguments.
_VALUES_FROM_SHAPE: dict[Any, Any] = {
    aten.ones_like.default: lambda args: 1, aten.zeros_like.default: lambda args: 0,
    aten.full_like.default: lambda args: args[1], aten.new_ones.default: lambda args: 1,
    aten.new_zeros.default: lambda args: 0, aten.new_full.default: lambda args: args[2]}


def _values_from_shape(func: Any, args: tuple, kwargs: dict) -> Any:
    """A real result for a ``_VALUES_FROM_SHAPE`` op on a fake input, where it is an integer
    or boolean tensor (a mask, lengths) and small; NotImplemented otherwise, and for a fill
    value that is itself a fake tensor."""
    source = args[0]
    size = tuple(args[1]) if _op_name(func).startswith("new_") else tuple(source.shape)
    fill = _VALUES_FROM_SHAPE[func](args)
    if isinstance(fill, torch.Tensor):
        return NotImplemented
    dtype = kwargs.get("dtype") or source.dtype
    if dtype.is_floating_point or dtype.is_complex:
        return NotImplemented  # an activation or optimizer state (zeros_like(p)): stays fake
    numel = 1
    for n in size:
        numel *= int(n)
    if numel * dtype.itemsize > REAL_RESULT_MAX_BYTES:
        return NotImplemented
    with really():
        return torch.full(size, fill, dtype=dtype, device="cpu")


STAND_IN_MAX_BYTES = 256 * 2**20  # fake inputs stood in for by real ones, at most


def _shapes_from_real_inputs(func: Any, args: tuple, kwargs: dict) -> Any:
    """A data-dependent op on real and fake inputs (``h[mask]``: ``aten.index`` with a real
    boolean mask): run it for real three times, with the fake inputs stood in for by zeros,
    by ones and by seeded random values. Outputs whose shapes differ between the runs depend
    on the fake inputs' values: NotImplemented (nobody knows them). Otherwise the shapes
    follow from the real inputs alone; an output equal in every run (an index, a count) does
    not depend on the fake inputs and stays real, the others become fake tensors of that
    shape. The random run is what tells ``unique`` apart: on zeros and on ones alike it
    gives one element (a voxel net's occupied voxels came out as 1 where a real batch has
    64,553, and the answer 19x above the truth)."""
    flat, spec = tree_flatten((args, kwargs))
    fakes = [t for t in flat if isinstance(t, torch.Tensor) and is_fake(t)]
    if (not fakes or _nbytes(fakes) > STAND_IN_MAX_BYTES or not _runs_for_real(func)
            or func is aten._local_scalar_dense.default):  # reading a fake value: unknowable
        return NotImplemented
    runs = []
    writes = func._schema.is_mutable  # each run on its own copies of the real tensors
    # Each fake tensor its own random values (the same tensor twice, the same values): with
    # one seed for all, ``torch.equal(a, b)`` of two different fakes was True on every run,
    # and the step went on as if it were known (review).
    seeds: dict[int, int] = {}
    for t in fakes:
        seeds.setdefault(id(t), len(seeds))
    with really():
        for fill in ("zeros", "ones", "random"):
            stood = [_stand_in(t, fill, seeds[id(t)]) if isinstance(t, torch.Tensor)
                     and is_fake(t) else
                     t.clone() if writes and isinstance(t, torch.Tensor) else t for t in flat]
            a, k = tree_unflatten(stood, spec)
            try:
                runs.append(tree_flatten(func(*a, **k))[0])
            except Exception:  # noqa: BLE001 - not explained by the real inputs
                return NotImplemented
    first, others = runs[0], runs[1:]
    for other in others:
        for z, o in zip(first, other):
            if isinstance(z, torch.Tensor) and z.shape != o.shape:
                return NotImplemented  # the shape depends on the fake inputs' values
            if not isinstance(z, torch.Tensor) and z != o:
                return NotImplemented  # a value read from them
    mutated = _mutated_args(func, args)
    out = []
    for i, z in enumerate(first):
        if i in mutated:
            out.append(mutated[i])  # an in-place op returns its (fake) argument
        elif not isinstance(z, torch.Tensor):
            out.append(z)
        else:
            with really():
                same = all(z.dtype == o[i].dtype and bool(torch.equal(z, o[i]))
                           for o in others)
            out.append(z if same and keep_real(z) else
                       torch.empty_strided(z.shape, z.stride(), dtype=z.dtype))
    result = func._schema.returns
    return out[0] if len(result) == 1 and not _returns_list(func) else tuple(out) if len(
        result) > 1 else out


def _stand_in(t: torch.Tensor, fill: str, seed: int = 0) -> torch.Tensor:
    """A real tensor of ``t``'s shape and dtype: zeros, ones, or values drawn from a
    generator seeded with ``seed`` (never the global RNG), varied enough that a
    value-dependent shape shows."""
    if fill != "random":
        return torch.full(t.shape, 0 if fill == "zeros" else 1, dtype=t.dtype)
    g = torch.Generator().manual_seed(seed)
    if t.dtype == torch.bool:
        return torch.randint(0, 2, t.shape, generator=g).bool()
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.rand(t.shape, generator=g).to(t.dtype)
    return torch.randint(0, 127, t.shape, generator=g).to(t.dtype)


def _returns_list(func: Any) -> bool:
    returns = func._schema.returns
    return len(returns) == 1 and str(returns[0].type).startswith("List")


def _mutated_args(func: Any, args: tuple) -> dict[int, Any]:
    """Output position -> the argument it aliases, for ops that write into an argument."""
    found = {}
    for i, ret in enumerate(func._schema.returns):
        if ret.alias_info is None or not ret.alias_info.is_write:
            continue
        for j, arg in enumerate(func._schema.arguments):
            if (arg.alias_info is not None and arg.alias_info.before_set == ret.alias_info.before_set
                    and j < len(args)):
                found[i] = args[j]
    return found


def _runs_for_real(func: Any) -> bool:
    # Random ops would draw from the real generator (and their values are no one's to know).
    return torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ())


def refusal_behind(exc: BaseException,
                   mode: RealWhereKnown | None = None) -> DataDependentOp | None:
    """Why a simulated step that failed with ``exc`` could not be simulated, or None when
    its failure is not the simulation's: ``exc`` itself, a refusal the step's code wrapped
    or swallowed (TorchScript re-raises it as a RuntimeError; ``mode``, the step's
    RealWhereKnown, remembers it), or the fake mode's own refusal where RealWhereKnown was
    not there to translate it (a read in another thread: dispatch modes are per thread)."""
    if isinstance(exc, DataDependentOp):
        return exc
    if mode is not None and mode.refused is not None:
        return mode.refused
    if _is_data_dependent(exc):
        func = getattr(exc, "func", None)
        return DataDependentOp(_advice(func), _what(func)) if func is not None else None
    return None


def _is_data_dependent(exc: BaseException) -> bool:
    from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                               DynamicOutputShapeException)

    return isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException))


def _op_name(func: Any) -> str:
    return getattr(func, "__name__", str(func)).removesuffix(".default")


def _what(func: Any) -> str:
    name = _op_name(func)
    if name == "_local_scalar_dense":
        return "the step reads a tensor's value (.item(), bool(t), `if t > 0:`)"
    schema = getattr(func, "_schema", None)
    if schema is not None and schema.returns and not any(
            "Tensor" in str(r.type) for r in schema.returns):  # torch.equal: a bool
        return f"the step reads aten.{name}'s result, which follows from a tensor's values"
    return f"the shape of aten.{name}'s output depends on a tensor's values"


def _random_advice(what: str) -> str:
    return (f"{what}, and that tensor is a random draw (`torch.rand(()) < p`: "
            "LayerDrop's test whether to skip a layer, say): the step's memory depends on a "
            "value that changes from step to step. Turn the random branch off to simulate the "
            "step that keeps every layer (e.g. layerdrop=0 in the model's config), or measure "
            "with real steps (`bsselect probe --method measured`)")


def _refusal(what: str, kind: str) -> DataDependentOp:
    """The error for a step that needs the values of a tensor that is a random draw
    (``DRAWN``) or stale (``WRITTEN``); ``what``: what the step did."""
    return DataDependentOp(_random_advice(what) if kind == DRAWN else _unknown_advice(what),
                           what)


def _unknown_advice(what: str) -> str:
    return (f"{what}, and that tensor was written in place from tensors whose values a "
            "simulation does not have (`buf.copy_(logits.argmax(-1))`, `counts.index_add_(...)` "
            "from the model's activations): its values would be stale. Measure with real steps "
            "instead (`bsselect probe --method measured`), or compute the tensor out of place "
            "from the batch's integer tensors")


def _advice(func: Any, capped: tuple[str, int] | None = None) -> str:
    if capped is not None:
        # At a large batch a tensor computed from the batch's integer tensors alone is over
        # the size the simulation computes for real: it was the limit, not the weights
        # (review: a packed GRU's lengths, (ids != 0).long().sum(1), at b = 528,406).
        op, nbytes = capped
        from ..units import format_bytes

        return (f"{_what(func)}, and at this batch size that tensor has no values: it "
                f"follows from {op} on the batch's integer tensors, whose "
                f"{format_bytes(nbytes)} result is over the "
                f"{format_bytes(REAL_RESULT_MAX_BYTES)} the simulation "
                "computes for real (or from the model's weights or the batch's floating-point "
                "tensors); smaller batches simulate")
    return _weights_advice(_what(func))


def _weights_advice(what: str) -> str:
    return (f"{what}, and that tensor is computed from the model's weights (in the "
            "forward, or in the optimizer's step: Adafactor reads its gradients' values) or the "
            "batch's floating-point tensors, whose values a simulation does not have (it has "
            "the batch's integer and boolean tensors and what is computed from them alone); "
            "measure with real steps instead (`bsselect probe --method measured`, on the "
            "target device for another device's answer), or keep value-dependent branches on "
            "the batch's integer tensors")


