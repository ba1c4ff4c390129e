"""`bsselect check --hf-config` on a Llama-7B-shaped config (issue 15): wall time and peak
resident memory of the whole command on this machine, and its agreement with Task.from_hf on
the same config. No weights are allocated: the model is built on the meta device.

    .venv/bin/python benchmarks/bench_hf_config.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from transformers import AutoConfig, LlamaConfig

    from bsselect import Task, check
    from bsselect.adapters.hf import RandomTokens

    with tempfile.TemporaryDirectory() as tmp:
        LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                    max_position_embeddings=4096,
                    architectures=["LlamaForCausalLM"]).save_pretrained(tmp)
        args = ["check", "--hf-config", str(Path(tmp) / "config.json"), "--seq-len", "4096",
                "--batch-size", "8", "--precision", "bf16", "--device-preset", "h100-80gb",
                "--json"]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bsselect", *args], capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        cli = json.loads(done.stdout)
        same = Task.from_hf(AutoConfig.from_pretrained(tmp), RandomTokens(32000, 4096), lr=1e-4)
        api = check(same, batch_size=8, precision="bf16", device_preset="h100-80gb")
    print(f"exit {done.returncode} (3: does not fit) in {wall:.1f} s, peak resident "
          f"{rss / 2**20:.0f} MiB")
    print(f"required {cli['required_bytes'] / 2**30:.1f} GiB of {cli['budget_bytes'] / 2**30:.1f} "
          f"GiB; fits={cli['fits']}; Task.from_hf on the same config: "
          f"{api.required_bytes / 2**30:.1f} GiB (equal: {api.required_bytes == cli['required_bytes']})")


if __name__ == "__main__":
    main()
