"""What cuDNN's RNN allocates in a training step, per op, on a real GPU.

    PYTHONPATH=. python3 benchmarks/bench_cudnn_rnn.py --out DIR

Needs a CUDA GPU. For each configuration (LSTM or GRU, layers, widths, sequence length,
batch, padded or packed, one or two directions, fp32 or bf16 autocast) it runs one forward
and backward of ``nn.LSTM``/``nn.GRU`` under a ``TorchDispatchMode`` that records, for every
``_cudnn_rnn`` and ``_cudnn_rnn_backward`` call, the bytes of each output (the reserve
buffer cuDNN keeps from forward to backward is one of them) and the allocator's peak inside
the call above what was live before it plus its outputs (the op's own workspace). Also the
bytes the forward leaves live for backward. Configurations are split in advance into
``fit`` (to write a rule from) and ``check`` (to test it on), by a fixed rule: every third
configuration is a check. Writes DIR/cudnn_rnn.json and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OPS = ("_cudnn_rnn", "_cudnn_rnn_backward", "_cudnn_rnn_flatten_weight")


class Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.high = 0  # the allocator's highest level inside any recorded op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name not in OPS:
            return func(*args, **(kwargs or {}))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = func(*args, **(kwargs or {}))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.high = max(self.high, peak)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        seen, out_bytes = set(), []
        for t in outs:
            key = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes() if key not in seen else 0
            seen.add(key)
            out_bytes.append(dict(shape=list(t.shape), dtype=str(t.dtype), nbytes=nbytes))
        after = torch.cuda.memory_allocated()
        self.calls.append(dict(op=name, out=out_bytes, new_live=after - before,
                               scratch=peak - after))
        return out


def configs():
    """(mode, layers, input, hidden, T, B, packed, bidirectional, precision)."""
    grid = itertools.product(("LSTM", "GRU"), (1, 2, 3), (128, 512), (256, 1024),
                             (32, 256), (8, 64), (False, True), (False, True),
                             ("fp32", "bf16"))
    out = []
    for i, c in enumerate(grid):
        # Thin the grid (768 combinations) to 96 spread across every factor.
        if i % 8 == (i // 8) % 8:
            out.append(c)
    return out


def series():
    """The second run: the same op at three batch sizes per configuration (B 8, 32, 128;
    T 128), to separate what grows with tokens from what does not. Every third
    configuration (all three batch sizes) is a check."""
    base = itertools.product(("LSTM", "GRU"), ((1, 256, 512, False), (2, 512, 1024, False),
                                               (3, 128, 256, True)),
                             (False, True), ("fp32", "bf16"))
    out = []
    for i, (mode, (layers, inp, hidden, bidir), packed, prec) in enumerate(base):
        for b in (8, 32, 128):
            out.append(("check" if i % 3 == 2 else "fit",
                        (mode, layers, inp, hidden, 128, b, packed, bidir, prec)))
    return out


def run_one(mode, layers, inp, hidden, T, B, packed, bidir, prec) -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rnn = getattr(torch.nn, mode)(inp, hidden, num_layers=layers, batch_first=True,
                                  bidirectional=bidir).to(dev)
    x = torch.randn(B, T, inp, device=dev, requires_grad=True)
    lengths = None
    if packed:
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(max(1, T // 8), T + 1, (B,), generator=g)
        lengths[0] = T
        xs = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                     enforce_sorted=False)
    else:
        xs = x
    torch.cuda.synchronize()
    rec = Recorder()
    base = torch.cuda.memory_allocated()
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if prec == "bf16"
           else torch.autocast("cuda", enabled=False))
    with rec:
        with ctx:
            y = rnn(xs)[0]
        data = y.data if packed else y
        torch.cuda.synchronize()
        live_after_forward = torch.cuda.memory_allocated() - base
        data.float().sum().backward()
    torch.cuda.synchronize()
    tokens = int(lengths.sum()) if packed else B * T
    return dict(mode=mode, layers=layers, input=inp, hidden=hidden, T=T, B=B, packed=packed,
                bidirectional=bidir, precision=prec, tokens=tokens,
                live_after_forward=live_after_forward, high_in_ops=rec.high - base,
                calls=rec.calls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--series", action="store_true",
                    help="the second run: three batch sizes per configuration")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name(0)}")
    print("| split | mode | L | in | H | T | B | packed | bi | prec | tokens | reserve | "
          "fwd scratch | bwd scratch | reserve / (L*dirs*tokens*H*elem) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    plan = (series() if args.series else
            [("check" if i % 3 == 2 else "fit", c) for i, c in enumerate(configs())])
    for split, c in plan:
        try:
            r = run_one(*c)
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(config=list(c), error=repr(exc)[:300]))
            print(f"| {split} | {c} | error {exc!r:.100} |", flush=True)
            continue
        r["split"] = split
        rows.append(r)
        fwd = [k for k in r["calls"] if k["op"] == "_cudnn_rnn"]
        bwd = [k for k in r["calls"] if k["op"] == "_cudnn_rnn_backward"]
        reserve = fwd[0]["out"][3]["nbytes"] if fwd and len(fwd[0]["out"]) > 3 else -1
        elem = 2 if r["precision"] == "bf16" else 4
        dirs = 2 if r["bidirectional"] else 1
        unit = r["layers"] * dirs * r["tokens"] * r["hidden"] * elem
        print(f"| {split} | {' | '.join(str(v) for v in c)} | {r['tokens']} | {reserve:,} | "
              f"{fwd[0]['scratch'] if fwd else -1:,} | "
              f"{bwd[0]['scratch'] if bwd else -1:,} | {reserve / unit:.3f} |", flush=True)
        torch.cuda.empty_cache()
    (out / ("cudnn_rnn_series.json" if args.series else "cudnn_rnn.json")).write_text(json.dumps(dict(
        torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
        device=torch.cuda.get_device_name(0), rows=rows), indent=1))
    print(f"[{time.time() - t0:.1f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
