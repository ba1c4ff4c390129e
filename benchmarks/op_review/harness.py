"""Harness: python harness.py NAME [bs...]  -> prints sim vs real per phase."""
import sys, json, time, math
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import TensorDataset
from bsselect import Task
from bsselect.memory.simulated import simulate_step_peak
from bsselect.memory.cpu_truth import cpu_step_peak

cands = __import__(__import__("os").environ.get("CANDS", "cands"))

def run(name, sizes=(8, 64)):
    rows = []
    for bs in sizes:
        task = getattr(cands, name)()
        t0 = time.time()
        try:
            s = simulate_step_peak(task, bs)
        except Exception as e:
            print(json.dumps(dict(name=name, bs=bs, sim_error=str(e)[:300]))); continue
        r = cpu_step_peak(task, bs)
        d = dict(name=name, bs=bs, sim=s.peak_bytes, real=r.peak_bytes,
                 pct=round(100 * (s.peak_bytes / r.peak_bytes - 1), 2),
                 sim_ph=[s.forward_peak_bytes, s.backward_peak_bytes, s.optimizer_peak_bytes],
                 real_ph=[r.forward_peak_bytes, r.backward_peak_bytes, r.optimizer_peak_bytes],
                 ph_pct=[round(100 * (a / b - 1), 2) if b else None for a, b in
                         zip([s.forward_peak_bytes, s.backward_peak_bytes, s.optimizer_peak_bytes],
                             [r.forward_peak_bytes, r.backward_peak_bytes, r.optimizer_peak_bytes])],
                 peak_phase=str(r.peak_phase.value), secs=round(time.time() - t0, 1))
        print(json.dumps(d), flush=True)

if __name__ == "__main__":
    names = sys.argv[1].split(",")
    sizes = tuple(int(a) for a in sys.argv[2:]) or (8, 64)
    for n in names:
        try:
            run(n, sizes)
        except Exception as e:
            print(json.dumps(dict(name=n, error=repr(e)[:400])), flush=True)
