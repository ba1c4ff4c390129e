"""cuDNN's LSTM and GRU, in a simulation that runs on fake ``cpu`` tensors.

On the CPU, ``nn.LSTM``/``nn.GRU`` run oneDNN (or cell by cell), which keeps per layer an
output and a workspace for backward; on CUDA one ``_cudnn_rnn`` call runs every layer and
keeps one *reserve* buffer. What it holds was measured op by op on an H200 (cuDNN 9.19,
``benchmarks/bench_cudnn_rnn.py``, 96 configurations: LSTM and GRU, 1-3 layers, widths
128-1024, padded and packed, one and two directions, float32 and autocast; results in
``benchmarks/results/cudnn-rnn-h200.json``): on every one, the reserve is

    directions x tokens x hidden x element size x (g x layers + layers - 1) + 256 B

with ``g`` = 5 for LSTM (four gates and the cell state) and 6 for GRU, ``tokens`` the
sequence positions actually run (a packed batch's sum of lengths, a padded one's B x T),
the element size that of the compute dtype, and ``layers - 1`` the inputs of the upper
layers. A CPU simulation overstated a packed 2 x 512 LSTM's bytes per sample by 1.7x on an
H100 (docs/benchmarks-cuda.md, section 6).

Inside ``cuda_rnn_policy()`` (a ``TorchFunctionMode``, so ``torch._VF.lstm``/``gru`` are seen
as ``nn.LSTM``/``nn.GRU`` call them), each call is replaced by one autograd function with
cuDNN's tensors: forward returns the output and final states and saves the reserve (and,
under autocast, cuDNN's 16-bit copies of the input and of the weights, one flat buffer);
backward returns the input's and states' gradients and the weights' as views of one flat
buffer (cast back to the weights' dtype under autocast). Values are not computed: outputs
are empty tensors of the right shapes (a simulation tracks bytes). The scratch cuDNN takes
inside the two calls and frees before they return is not a tensor here; it is part of the
cuDNN workspace allowance (``targets.cudnn_allowance``). Left on the CPU's path: projections
(``proj_size``), dropout between layers, inference mode and ``nn.RNN`` (none was measured).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

GATE_WORDS = {"lstm": 5, "gru": 6}  # per layer, direction, token and hidden unit
RESERVE_PAD_BYTES = 256
# Scratch inside one call, an upper bound: a x the weights' float32 bytes + k x tokens x
# directions x hidden x 4 B + c. Fitted as the tightest such bound (least total ratio) over
# the configurations set aside to fit it (112 of 168, two runs of bench_cudnn_rnn.py); it
# bounds the 56 set aside to check it. Median 2.1x the real scratch: cuDNN's choice of
# algorithm makes it vary 2-12 units per token between configurations.
SCRATCH_PER_WEIGHT_BYTE = 1.0
SCRATCH_PER_TOKEN_UNIT = 10.0
SCRATCH_BASE_BYTES = 53 * 2**20


def reserve_bytes(mode: str, layers: int, directions: int, tokens: int, hidden: int,
                  element_size: int) -> int:
    """Bytes of the reserve buffer cuDNN keeps from forward to backward (measured formula)."""
    g = GATE_WORDS[mode]
    return (directions * tokens * hidden * element_size * (g * layers + layers - 1)
            + RESERVE_PAD_BYTES)


class _CudnnRNN(torch.autograd.Function):
    """One ``_cudnn_rnn`` call and its backward, by the bytes they hold."""

    @staticmethod
    def forward(ctx: Any, meta: dict, x: torch.Tensor, *rest: torch.Tensor) -> Any:
        n_states = meta["n_states"]
        states, weights = rest[:n_states], rest[n_states:]
        dtype = meta["compute"]
        ctx.meta = meta
        ctx.x_dtype = x.dtype
        ctx.state_dtypes = [s.dtype for s in states]
        ctx.weight_meta = [(w.shape, w.dtype) for w in weights]
        device = x.device
        if x.dtype != dtype:  # autocast: cuDNN runs on 16-bit copies of input and weights
            x = torch.empty(x.shape, dtype=dtype, device=device)
            flat_weights = torch.empty(sum(w.numel() for w in weights), dtype=dtype,
                                       device=device)
            states = tuple(torch.empty(s.shape, dtype=dtype, device=device) for s in states)
        else:
            flat_weights = None
        tokens, batch = meta["tokens"], meta["batch"]
        hidden, dirs, layers = meta["hidden"], meta["directions"], meta["layers"]
        reserve = torch.empty(reserve_bytes(meta["mode"], layers, dirs, tokens, hidden,
                                            dtype.itemsize), dtype=torch.uint8, device=device)
        out = torch.empty((*x.shape[:-1], dirs * hidden), dtype=dtype, device=device)
        finals = tuple(torch.empty((layers * dirs, batch, hidden), dtype=dtype,
                                   device=device) for _ in range(n_states))
        _scratch(meta, device)
        # What autograd keeps for _cudnn_rnn_backward: input, states, output, reserve and
        # the weight buffer (a new one only under autocast).
        saved = [x, *states, out, reserve] + ([flat_weights] if flat_weights is not None
                                              else [])
        ctx.save_for_backward(*saved)
        return (out, *finals)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        saved = ctx.saved_tensors  # held until backward ends, as cuDNN holds the reserve
        meta = ctx.meta
        dtype = meta["compute"]
        device = saved[-1].device
        dx = torch.empty(meta["x_shape"], dtype=dtype, device=device)
        dstates = [torch.empty((meta["layers"] * meta["directions"], meta["batch"],
                                meta["hidden"]), dtype=dtype, device=device)
                   for _ in ctx.state_dtypes]
        numel = sum(shape.numel() for shape, _ in ctx.weight_meta)
        flat = torch.empty(numel, dtype=dtype, device=device)
        _scratch(meta, device)
        dweights, offset = [], 0
        for shape, wdtype in ctx.weight_meta:
            view = flat[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
            dweights.append(view if wdtype == dtype else view.to(wdtype))
        del flat
        if ctx.x_dtype != dtype:
            dx = dx.to(ctx.x_dtype)
        dstates = [d if d.dtype == sd else d.to(sd) for d, sd in zip(dstates, ctx.state_dtypes)]
        return (None, dx, *dstates, *dweights)


def scratch_bytes(meta: dict) -> int:
    """An upper bound of the scratch cuDNN takes and frees inside one forward or backward
    call (see ``SCRATCH_*``)."""
    per_token = SCRATCH_PER_TOKEN_UNIT * meta["directions"] * meta["hidden"] * 4
    return int(SCRATCH_PER_WEIGHT_BYTE * 4 * meta["weight_numel"]
               + per_token * meta["tokens"] + SCRATCH_BASE_BYTES)


def _scratch(meta: dict, device: torch.device) -> None:
    """Allocate and free the call's scratch: the counter sees it at its moment of the step."""
    torch.empty(scratch_bytes(meta), dtype=torch.uint8, device=device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """CUDA's autocast runs cuDNN's RNN in 16 bits (autocast is emulated on the CPU's key)."""
    if torch.is_autocast_enabled("cpu") and x.dtype in (torch.float32, torch.float16,
                                                        torch.bfloat16):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def routed_rnn(mode: str, args: tuple) -> Optional[tuple]:
    """cuDNN's version of ``torch.lstm``/``torch.gru`` called with ``args``, or None where
    it is not modelled (the caller then runs the CPU's op)."""
    if len(args) != 9:
        return None
    packed = isinstance(args[1], torch.Tensor) and (mode == "lstm" or
                                                    isinstance(args[2], torch.Tensor))
    if packed:
        x, _batch_sizes, hx, params, has_biases, layers, dropout, train, bidir = args
        batch_first = False
    else:
        x, hx, params, has_biases, layers, dropout, train, bidir, batch_first = args
    states = tuple(hx) if mode == "lstm" else (hx,)
    dirs = 2 if bidir else 1
    per = 4 if has_biases else 2
    if (not train or (dropout and layers > 1) or len(params) != layers * dirs * per
            or not all(isinstance(s, torch.Tensor) and s.dim() == 3 for s in states)
            or x.dim() not in ((2,) if packed else (3,))):
        return None
    hidden = states[0].shape[-1]
    if any(s.shape[-1] != hidden for s in states):  # projections: not modelled
        return None
    batch = states[0].shape[1]
    tokens = x.shape[0] if packed else x.shape[0] * x.shape[1]
    meta = dict(mode=mode, layers=layers, directions=dirs, hidden=hidden, batch=batch,
                tokens=tokens, weight_numel=sum(p.numel() for p in params), n_states=len(states), compute=_compute_dtype(x),
                x_shape=x.shape, batch_first=batch_first)
    out, *finals = _CudnnRNN.apply(meta, x, *states, *params)
    if mode == "lstm":
        return out, finals[0], finals[1]
    return out, finals[0]


def routes(module: torch.nn.Module) -> bool:
    """Whether ``cuda_rnn_policy`` models this module's cuDNN call (then its scratch is part
    of the simulation, not of the cuDNN allowance)."""
    return (isinstance(module, (torch.nn.LSTM, torch.nn.GRU))
            and not getattr(module, "proj_size", 0)
            and not (module.dropout and module.num_layers > 1))


class _RnnPolicy(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        mode = {torch.lstm: "lstm", torch.gru: "gru"}.get(func)
        if mode is not None and not kwargs:
            routed = routed_rnn(mode, args)
            if routed is not None:
                return routed
        return func(*args, **(kwargs or {}))


@contextmanager
def cuda_rnn_policy() -> Iterator[None]:
    """Run ``nn.LSTM``/``nn.GRU`` as cuDNN would keep their tensors (see the module doc)."""
    with _RnnPolicy():
        yield
