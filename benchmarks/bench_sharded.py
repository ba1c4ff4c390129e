"""Sharded training (issue 16): the simulated FSDP2 rank against real gloo runs, and the cost
of `bsselect check` on Llama-shaped models sharded over many ranks.

    .venv/bin/python benchmarks/bench_sharded.py [--repeats 3] [--skip-scale] [--json out.json]

1. **Agreement.** For a GPT-shaped model (the `tiny-lm` example) and a Llama-shaped one (a
   4-layer `LlamaForCausalLM` from a local config), at 2 and 4 ranks, with activation
   checkpointing off and on: bsselect's simulated peak of training step 2 for one rank
   (``simulate_step_peak`` with a ``ShardPlan``: fake process group, fake tensors, this CPU's
   kernel scratch) against the real thing — ``torchrun`` with gloo on this machine, each rank
   wrapping the model with the same ``fully_shard`` calls and reading the CPU allocator's own
   events over step 2 (``cpu_truth.cpu_step_peak``, an independent measurement). Each real
   run is repeated: gloo runs collectives on worker threads and a buffer is freed when its
   collective completes, which on a rank that waits for its peer can come later than the
   program releases it, so the real peak varies from run to run; min and max are reported.
2. **Scale.** `bsselect check --hf-config` on 7B-, 13B- and 70B-shaped Llama configs, FSDP2
   over 8 to 512 ranks (``SCALE_RUNS``), seq 4096, bf16, activation checkpointing, batch 1,
   one process each: wall time and peak resident memory (no weights are allocated: meta and
   fake tensors only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "sharded_driver.py"
SCALE = {  # Llama-2/3-shaped: hidden, intermediate, layers, heads, kv heads, vocab
    "7B": (4096, 11008, 32, 32, 32, 32000),
    "13B": (5120, 13824, 40, 40, 40, 32000),
    "70B": (8192, 28672, 80, 64, 8, 32000),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama_config(directory: Path, hidden: int, inter: int, layers: int, heads: int, kv: int,
                 vocab: int, positions: int = 4096) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=positions,
                architectures=["LlamaForCausalLM"]).save_pretrained(directory)
    return directory / "config.json"


def real_peaks(task: str, batch: int, world: int, checkpointing: bool,
               extra: list[str]) -> list[dict]:
    """One torchrun of the driver: each rank's record."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world), str(DRIVER), task, str(batch), "--out", out,
               *extra]
        if checkpointing:
            cmd.append("--checkpointing")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise SystemExit(f"torchrun failed ({done.returncode}): {done.stderr[-2000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def agreement(repeats: int, tmp: Path) -> list[dict]:
    from bsselect.api import hf_config_task, resolve_task
    from bsselect.memory.sharded import ShardPlan
    from bsselect.memory.simulated import simulate_step_peak
    from bsselect.step import StepSettings

    llama = llama_config(tmp / "llama-tiny", 128, 344, 4, 4, 2, 512, 256)
    models = {"GPT (tiny-lm), b=8 x 64 tokens": ("tiny-lm", 8, []),
              "Llama (4 layers, GQA), b=4 x 128 tokens": (f"hf:{llama}", 4,
                                                          ["--seq-len", "128"])}
    rows = []
    for label, (spec, batch, extra) in models.items():
        if spec.startswith("hf:"):
            task, _ = hf_config_task(None, spec[3:], 128)
        else:
            task, _ = resolve_task(spec)
        for world in (2, 4):
            for checkpointing in (False, True):
                plan = ShardPlan(world, checkpointing=checkpointing)
                t0 = time.perf_counter()
                sim = simulate_step_peak(task, batch, settings=StepSettings(shard=plan))
                sim_s = time.perf_counter() - t0
                runs = [real_peaks(spec, batch, world, checkpointing, extra)
                        for _ in range(repeats)]
                per_rank = [[run[r]["peak_bytes"] for run in runs] for r in range(world)]
                row = dict(model=label, world_size=world, checkpointing=checkpointing,
                           simulated=sim.peak_bytes, simulated_s=round(sim_s, 2),
                           real=per_rank,
                           err_min=[min(p) / sim.peak_bytes - 1 for p in per_rank],
                           err_max=[max(p) / sim.peak_bytes - 1 for p in per_rank])
                rows.append(row)
                log(f"{label} W={world} AC={checkpointing}: simulated {sim.peak_bytes:,}; "
                    f"real per rank min/max {[(min(p), max(p)) for p in per_rank]}")
    return rows


SCALE_RUNS = (("7B", 8), ("7B", 512), ("13B", 64), ("70B", 8), ("70B", 512))


def scale(tmp: Path) -> list[dict]:
    rows = []
    for name, world in SCALE_RUNS:
        config = llama_config(tmp / name, *SCALE[name])
        args = ["check", "--hf-config", str(config), "--seq-len", "4096", "--batch-size",
                "1", "--precision", "bf16", "--device-preset", "h100-80gb", "--shard",
                "fsdp", "--world-size", str(world), "--activation-checkpointing", "--json"]
        cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "bsselect", *args]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t0
        rss_kib = int(done.stderr.strip().splitlines()[-1])
        out = json.loads(done.stdout)
        row = dict(model=name, world_size=world, wall_s=round(wall, 1),
                   rss_mib=round(rss_kib / 1024), exit=done.returncode,
                   required_gib=round(out["required_bytes"] / 2**30, 2),
                   max_batch=out["max_batch"], tokens=out.get("tokens_per_sample"),
                   saves_gib=round((out.get("checkpointing_saves_bytes") or 0) / 2**30, 2),
                   checked=out.get("max_batch_checked"))
        rows.append(row)
        log(f"{name} over {world}: {row}")
    return rows


def render(agree: list[dict], scaled: list[dict]) -> str:
    lines = ["| model | ranks | checkpointing | simulated rank peak | real peak per rank, "
             "min–max over runs | error, min run (worst rank) | error, max run (worst rank) |",
             "|---|---:|:---:|---:|---|---:|---:|"]
    for r in agree:
        real = "; ".join(f"r{i}: {min(p):,}–{max(p):,}" for i, p in enumerate(r["real"]))
        lines.append(f"| {r['model']} | {r['world_size']} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['simulated']:,} | {real} | "
                     f"{max(r['err_min'], key=abs):+.3%} | {max(r['err_max'], key=abs):+.3%} |")
    if scaled:
        lines += ["", "| model | ranks | wall s | peak RSS MiB | required per rank (b=1) GiB | "
                  "largest per-device batch | search after the line | checkpointing saves GiB "
                  "| exit |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in scaled:
            search = ", ".join(r.get("checked") or []) or "—"
            lines.append(f"| {r['model']} | {r['world_size']} | {r['wall_s']} | {r['rss_mib']} "
                         f"| {r['required_gib']} | {r['max_batch']} | {search} | "
                         f"{r['saves_gib']} | {r['exit']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        agree = [] if args.skip_agreement else agreement(args.repeats, Path(tmp))
        scaled = [] if args.skip_scale else scale(Path(tmp))
    print(render(agree, scaled))
    if args.json:
        args.json.write_text(json.dumps(dict(agreement=agree, scale=scaled), indent=1))


if __name__ == "__main__":
    main()
