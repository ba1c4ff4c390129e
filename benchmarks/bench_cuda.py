"""The CUDA-side numbers against a real GPU: simulated ``--target cuda`` vs measured.

    PYTHONPATH=. python3 benchmarks/bench_cuda.py --out DIR [--sections peaks,capped,whole,timing,cli]

Needs a CUDA GPU (none on the development machines; run where one is lent). Writes
DIR/bench_cuda.json after every section and prints Markdown tables. Sections:

* ``env``: the device, torch, and the memory the process holds outside the caching allocator
  (CUDA context and loaded kernels) after the other sections ran.
* ``peaks``: per model and precision, the simulation with CUDA's rules (autocast lists,
  foreach optimizer; tensors only, no CUDA terms) against the allocator's
  ``max_memory_allocated`` over a real second training step at the same two batch sizes, and
  ``max_memory_reserved`` beside it (what the fragmentation term stands for).
* ``capped``: the caching allocator capped (``set_per_process_memory_fraction``) at a size
  that puts the largest batch at a few dozen to a few thousand; the truth is the largest
  batch at which two real training steps on a fresh model run under that cap (exponential
  search, then bisection, each try after ``empty_cache``); against it ``probe`` measured
  (real steps on this GPU) and ``probe --method simulated --target cuda`` (the budget being
  the allocator's, so no context term), each at margin 0 and at the default 0.2.
* ``whole``: ``check --hf-config`` (Llama-7B widths, fewer layers, bf16) with the whole GPU as
  the budget (context term included) against the largest batch that really trains on it.
* ``timing``: step times of tiny-lm at powers of two, interleaved rounds with
  ``synchronize`` (bsselect.selection.timing), and the sweep's constrained fit through them.
* ``cli``: ``bsselect probe``/``noise``/``sweep`` on ``--device cuda`` end to end, JSON kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bsselect.device import Budget  # noqa: E402
from bsselect.examples import EXAMPLES  # noqa: E402
from bsselect.memory.measured import AcceleratorAllocator, run_two_steps  # noqa: E402
from bsselect.memory.probe import Method, model_uses_cudnn, run_probe  # noqa: E402
from bsselect.memory.simulated import simulate_step_peak  # noqa: E402
from bsselect.memory.targets import Target  # noqa: E402
from bsselect.oom import is_oom_error  # noqa: E402
from bsselect.precision import Precision  # noqa: E402
from bsselect.step import StepSettings  # noqa: E402
from cuda_cases import PLANS, cases, hf_dir, inputs_of, llama_dir, on_gpu  # noqa: E402

MiB, GiB = 2**20, 2**30
RESULTS: dict = {}
HELDOUT = False  # --cases heldout
CASES = "tune"
ONLY: list[str] = []  # --only: "name/precision" of the cases to run
METHODS = ("measured", "simulated")  # --methods
TAG = ""


def settings_for(precision: str, target: bool, name: str | None = None) -> StepSettings:
    """The step's settings; ``name``: a case simulated with a plan (``PLANS``) gets it."""
    return StepSettings(precision=Precision(precision),
                        target_device="cuda" if target else None, shard=PLANS.get(name))


def save(out: Path) -> None:
    name = {"heldout": "bench_cuda_heldout", "seq": "bench_cuda_seq",
            "recompute": "bench_cuda_recompute"}.get(CASES, "bench_cuda")
    name += f"{TAG}.json"
    (out / name).write_text(json.dumps(RESULTS, indent=1, default=str))


def real_peaks(task, b: int, settings: StepSettings) -> tuple[int, int]:
    """max_memory_allocated and max_memory_reserved over the second real step at ``b``."""
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    class Both(AcceleratorAllocator):
        reserved = 0

        def peak_bytes(self) -> int:
            Both.reserved = int(torch.cuda.max_memory_reserved())
            return super().peak_bytes()

    alloc = run_two_steps(task, b, Both(dev), settings=settings, inputs=inputs_of(task, CASES))
    return alloc, Both.reserved


def fits(task, b: int, settings: StepSettings) -> bool:
    torch.cuda.empty_cache()
    try:
        run_two_steps(task, b, AcceleratorAllocator(torch.device("cuda")), settings=settings,
                      inputs=inputs_of(task, CASES))
        return True
    except Exception as exc:  # noqa: BLE001
        if not is_oom_error(exc):
            raise
        del exc
        torch.cuda.empty_cache()
        return False


def true_max(task, settings: StepSettings, guess: int, limit: int = 2**22) -> tuple[int, int]:
    """(largest batch that trains, tries). Exponential search around ``guess``, bisection."""
    tries = 0
    lo, hi = 0, None
    b = max(1, guess)
    while hi is None:
        tries += 1
        if fits(task, b, settings):
            lo = b
            if b >= limit:
                return b, tries
            b = min(2 * b, limit)
        else:
            hi = b
            if lo == 0:
                while b > 1:
                    b //= 2
                    tries += 1
                    if fits(task, b, settings):
                        lo = b
                        break
                    hi = b
                if lo == 0:
                    return 0, tries
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tries += 1
        if fits(task, mid, settings):
            lo = mid
        else:
            hi = mid
    return lo, tries


def pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f}%" if b else "n/a"


def section_peaks(out: Path) -> None:
    rows = []
    print("\n## peaks: simulated (--target cuda, tensors only) vs max_memory_allocated\n")
    print("| model | precision | b | simulated | allocated | sim vs real | reserved | "
          "reserved - allocated |")
    print("|---|---|---|---|---|---|---|---|")
    for name, sim_task, task, prec, _t, sizes in cases(CASES):
        if ONLY and f"{name}/{prec}" not in ONLY:
            continue
        for b in sizes:
            try:
                sim = simulate_step_peak(sim_task, b, kernel_workspace=False,
                                         settings=settings_for(prec, True, name),
                                         inputs=inputs_of(sim_task, CASES))
                alloc, reserved = real_peaks(task, b, settings_for(prec, False))
            except Exception as exc:  # noqa: BLE001 - one case's failure is a row
                rows.append(dict(model=name, precision=prec, batch=b,
                                 error=traceback.format_exc()[-1500:]))
                print(f"| {name} | {prec} | {b} | error: {repr(exc)[:200]} |", flush=True)
                del exc
                torch.cuda.empty_cache()
                continue
            row = dict(model=name, precision=prec, batch=b, simulated=sim.peak_bytes,
                       simulated_rounded=sim.rounded_peak_bytes, allocated=alloc,
                       reserved=reserved, optimizer_impl=sim.optimizer_impl)
            rows.append(row)
            print(f"| {name} | {prec} | {b} | {sim.peak_bytes:,} | {alloc:,} | "
                  f"{pct(sim.peak_bytes, alloc)} | {reserved:,} | "
                  f"{pct(reserved, alloc)} |", flush=True)
    RESULTS["peaks"] = rows
    save(out)


def section_capped(out: Path) -> None:
    rows = []
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    print("\n## capped: largest batch under an allocator cap\n")
    print("| model | precision | cap | true max | measured m=0 | simulated m=0 | measured "
          "m=0.2 | simulated m=0.2 | sim fixed | sim per sample |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, sim_task, task, prec, target_b, _s in cases(CASES):
        if ONLY and not any(o == f"{name}/{prec}" for o in ONLY):
            continue
        t0 = time.time()
        sim_settings = settings_for(prec, False)
        # The cap: about where the simulation puts target_b, plus room for the CUDA terms.
        at = simulate_step_peak(sim_task, target_b, kernel_workspace=False,
                                settings=settings_for(prec, True, name),
                                inputs=inputs_of(sim_task, CASES)).peak_bytes
        # Hopper's cuBLAS + cuBLASLt workspaces are 64 MiB; cuDNN's vary.
        extra = (72 + (256 if model_uses_cudnn(sim_task) else 0)) * MiB
        cap = int(math.ceil((at * 1.1 + extra) / MiB)) * MiB
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            # Real steps stop at the dataset's size, as the measured probe does.
            truth, tries = true_max(task, sim_settings, target_b,
                                    limit=len(task.train_data))
            answers = {}
            for method, target in ((Method.measured, Target.same),
                                   (Method.simulated, Target.cuda)):
                if method.value not in METHODS:
                    continue
                for margin in (0.0, 0.2):
                    try:
                        r = run_probe(task if method is Method.measured else sim_task,
                                      task_name=name, device=dev if method is
                                      Method.measured else torch.device("cpu"),
                                      budget=Budget(cap, "cap"), method=method, margin=margin,
                                      target=target, budget_is_total=False,
                                      settings=sim_settings if method is Method.measured
                                      else settings_for(prec, False, name),
                                      inputs=inputs_of(task, CASES))
                        answers[f"{method.value}_{margin}"] = dict(
                            max_batch=r.max_batch, fixed=r.fixed_bytes,
                            per_sample=r.per_sample_bytes,
                            terms=[(t.name, t.bytes) for t in r.terms])
                    except Exception as exc:  # noqa: BLE001
                        answers[f"{method.value}_{margin}"] = dict(error=repr(exc)[:300])
                    torch.cuda.empty_cache()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        row = dict(model=name, precision=prec, cap=cap, true_max=truth, tries=tries,
                   seconds=round(time.time() - t0, 1), **answers)
        rows.append(row)

        def mb(key: str) -> str:
            a = answers.get(key, {})
            return str(a.get("max_batch", a.get("error", "?")[:40]))

        sim0 = answers.get("simulated_0.0", {})
        print(f"| {name} | {prec} | {cap / MiB:,.0f} MiB | {truth} | {mb('measured_0.0')} | "
              f"{mb('simulated_0.0')} | {mb('measured_0.2')} | {mb('simulated_0.2')} | "
              f"{sim0.get('fixed', 0):,} | {sim0.get('per_sample', 0):,} |", flush=True)
        RESULTS["capped"] = rows
        save(out)


def section_whole(out: Path) -> None:
    from bsselect import api
    from bsselect.adapters.hf import config_task

    print("\n## whole: check on the whole GPU vs the largest batch that trains\n")
    total = torch.cuda.get_device_properties(0).total_memory
    rows = []
    empty = Path(tempfile.mkdtemp()) / "pyproject.toml"  # no [tool.bsselect] settings
    empty.write_text("")
    if HELDOUT:  # Qwen2-7B widths (GQA, 152k vocabulary): the logits dominate
        wholes = [(hf_dir(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                          hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
                          num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                          max_position_embeddings=4096, tie_word_embeddings=False),
                   "Qwen2-7B widths, 4 layers", 4096, "bf16")]
    else:
        wholes = [(llama_dir(4, 4096, 11008, 32), "Llama-7B widths, 4 layers", 2048, "bf16")]
    for cfg, label, seq, prec in wholes:
        t0 = time.time()
        checks = {}
        for margin in (0.0, 0.2):
            r = api.check(hf_config=cfg, seq_len=seq, precision=prec, target="cuda",
                          memory=total, margin=margin, batch_size=1,
                          config=empty)
            checks[str(margin)] = dict(max_batch=r.max_batch, exact=r.max_batch_exact,
                                       required_at_1=r.required_bytes,
                                       terms=[(t.name, t.bytes) for t in r.terms])
        guess = max(1, checks["0.0"]["max_batch"])
        task = on_gpu(config_task(cfg, seq))
        truth, tries = true_max(task, settings_for(prec, False), guess)
        row = dict(config=f"{label}, seq {seq}", precision=prec,
                   total=total, check=checks, true_max=truth, tries=tries,
                   seconds=round(time.time() - t0, 1))
        rows.append(row)
        print(f"| {row['config']} | {prec} | total {total / GiB:.1f} GiB | check m=0: "
              f"{checks['0.0']['max_batch']} | check m=0.2: {checks['0.2']['max_batch']} | "
              f"true max: {truth} ({tries} tries, {row['seconds']} s) |", flush=True)
    RESULTS["whole"] = rows
    save(out)


def section_timing(out: Path) -> None:
    from bsselect.selection.steptime import physical_fit
    from bsselect.selection.timing import interleaved_rounds
    from bsselect.step import make_batch, to_device, train_step

    print("\n## timing: tiny-lm step times on CUDA, interleaved rounds\n")
    dev = torch.device("cuda")
    task = EXAMPLES["tiny-lm"]()
    sizes = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    steppers = {}
    keep = []
    for b in sizes:
        torch.manual_seed(0)
        model = task.model().to(dev)
        opt = task.make_optimizer(model.parameters(), task.lr)
        x, y = to_device(make_batch(task, b, 0, None), dev)
        keep.append((model, opt, x, y))

        def step(model=model, opt=opt, x=x, y=y) -> float:
            torch.cuda.synchronize()
            t = time.perf_counter()
            train_step(model, opt, task, x, y)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        steppers[b] = step
    timings = interleaved_rounds(steppers)
    est = [timings[b].step.mid for b in sizes]
    fit = physical_fit(sizes, est)
    fitted = [fit.at(b) for b in sizes]
    RESULTS["timing"] = dict(raw=[timings[b].to_dict() for b in sizes], fit=fitted)
    print("| b | step time (ms) | interval (ms) | fit (ms) | per sample (us) |")
    print("|---|---|---|---|---|")
    for b, e, f in zip(sizes, est, fitted):
        t = timings[b].step
        print(f"| {b} | {1e3 * e:.3f} | {1e3 * t.lo:.3f}-{1e3 * t.hi:.3f} | {1e3 * f:.3f} | "
              f"{1e6 * f / b:.2f} |")
    save(out)


def section_cli(out: Path) -> None:
    print("\n## cli: bsselect on --device cuda\n", flush=True)
    runs = {
        "probe_tiny_lm": ["probe", "tiny-lm", "--device", "cuda", "--json"],
        "probe_sim_cuda": ["probe", "tiny-lm", "--method", "simulated", "--target", "cuda",
                           "--memory", "8GiB", "--json"],
        "noise_digits": ["noise", "--device", "cuda", "--json"],
        "sweep_digits": ["sweep", "--device", "cuda", "--json", "--overwrite"],
    }
    res = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        for key, args in runs.items():
            t0 = time.time()
            p = subprocess.run([sys.executable, "-m", "bsselect", *args], cwd=tmp, env=env,
                               capture_output=True, text=True, timeout=240)
            res[key] = dict(rc=p.returncode, seconds=round(time.time() - t0, 1),
                            stdout=p.stdout[-20000:], stderr=p.stderr[-3000:])
            print(f"{key}: rc {p.returncode} in {res[key]['seconds']} s; "
                  f"stderr tail: {p.stderr[-300:]!r}", flush=True)
            RESULTS["cli"] = res
            save(out)


def section_env(out: Path) -> None:
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    RESULTS["env"] = dict(
        torch=torch.__version__, device=props.name, total=total, free=free,
        reserved=torch.cuda.memory_reserved(), allocated=torch.cuda.memory_allocated(),
        outside_allocator=total - free - torch.cuda.memory_reserved(),
        cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        capability=f"{props.major}.{props.minor}")
    print("\n## env\n", json.dumps(RESULTS["env"], indent=1), flush=True)
    save(out)


def section_context(out: Path) -> None:
    """A fresh process: memory outside the allocator after init, after a matmul (cuBLAS
    handle + workspace), after a conv (cuDNN), and the allocator's own bytes for each."""
    code = r"""
import json, torch
r = {}
def note(k):
    torch.cuda.synchronize(); f, t = torch.cuda.mem_get_info()
    r[k] = dict(used=t - f, reserved=torch.cuda.memory_reserved(),
                allocated=torch.cuda.memory_allocated())
torch.zeros(1, device="cuda"); note("init")
a = torch.randn(256, 256, device="cuda"); (a @ a).sum().item(); note("fp32 matmul")
a.bfloat16().matmul(a.bfloat16()).sum().item(); note("bf16 matmul")
x = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
c = torch.nn.Conv2d(3, 16, 3).cuda(); c(x).sum().backward(); note("conv fwd+bwd")
print(json.dumps(r))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    try:
        RESULTS["context"] = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001
        RESULTS["context"] = dict(error=p.stderr[-2000:])
    print("\n## context (fresh process)\n", json.dumps(RESULTS["context"], indent=1),
          flush=True)
    save(out)


SECTIONS = dict(context=section_context, peaks=section_peaks, capped=section_capped,
                timing=section_timing, cli=section_cli, whole=section_whole,
                env=section_env)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="context,peaks,capped,whole,timing,cli,env")
    ap.add_argument("--cases", choices=("tune", "heldout", "seq", "recompute"),
                    default="tune",
                    help="tune: the models the CUDA terms were set on; heldout: the second "
                         "run's; seq: variable-length models and a ViT (third run); "
                         "recompute: activation checkpointing, sliding windows, eval mode "
                         "(fourth)")
    ap.add_argument("--only", default="",
                    help="comma-separated name/precision of the cases to run (peaks, capped)")
    ap.add_argument("--methods", default="measured,simulated",
                    help="the probe methods the capped section runs")
    ap.add_argument("--tag", default="", help="suffix of the JSON's file name")
    args = ap.parse_args()
    global HELDOUT, CASES, ONLY, METHODS, TAG
    HELDOUT = args.cases == "heldout"
    CASES = args.cases
    ONLY = [o for o in args.only.split(",") if o]
    METHODS = tuple(args.methods.split(","))
    TAG = args.tag
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sections.split(","):
        t0 = time.time()
        try:
            SECTIONS[name](out)
        except Exception:  # noqa: BLE001
            RESULTS.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            traceback.print_exc()
            save(out)
        print(f"[{name}: {time.time() - t0:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
