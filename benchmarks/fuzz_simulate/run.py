"""python run.py START COUNT [out.jsonl] [GENERATOR]  -- differential fuzz: simulate_step_peak vs
cpu_step_peak. GENERATOR: gen (the default: gen.gen_case), tf (gen_tf.gen_case: hand-built
transformers and tiny Hugging Face models), tf2 (gen_tf.gen_case_w2: other attention code, MoE,
more HF architectures) or tf2big (gen_tf.gen_case2 with longer sequences and batches)."""
import json, os, signal, sys, time, traceback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
torch.set_num_threads(1)
from bsselect.memory import simulate_step_peak, cpu_step_peak
from gen import gen_case

PH = ("forward_peak_bytes", "backward_peak_bytes", "optimizer_peak_bytes", "peak_bytes")


class Timeout(Exception):
    pass


def _alarm(*a):
    raise Timeout()


def compare(s, r):
    out = {}
    flag = False
    for p in PH:
        a, b = getattr(s, p), getattr(r, p)
        d = a - b
        out[p[:3] if p != "peak_bytes" else "peak"] = [a, b, d]
        if abs(d) > max(64, 0.005 * b):
            flag = True
    exact = all(abs(v[2]) <= 64 for v in out.values())
    return out, flag, exact


def run_case(seed, **kw):
    c = gen_case(seed, **kw)
    rec = dict(c["desc"])
    rec["arch"] = repr(c["task"].model())[:3000]
    t0 = time.time()
    try:
        s = simulate_step_peak(c["task"], c["bs"], settings=c["settings"])
        sim_err = None
    except Exception as e:
        s = None; sim_err = f"{type(e).__name__}: {e}"[:600]
    try:
        r = cpu_step_peak(c["task"], c["bs"], settings=c["settings"])
        real_err = None
    except Exception as e:
        r = None; real_err = f"{type(e).__name__}: {e}"[:600]
    rec["secs"] = round(time.time() - t0, 2)
    if sim_err or real_err:
        rec["sim_err"] = sim_err; rec["real_err"] = real_err
        rec["status"] = ("both_fail" if sim_err and real_err else
                         "sim_fail" if sim_err else "real_fail")
        return rec
    rec["ph"], flag, exact = compare(s, r)
    rec["start"] = [s.start_bytes, r.start_bytes]
    rec["status"] = "flag" if flag else ("exact" if exact else "close")
    return rec


if __name__ == "__main__":
    start, count = int(sys.argv[1]), int(sys.argv[2])
    out = sys.argv[3] if len(sys.argv) > 3 else "fuzz.jsonl"
    if len(sys.argv) > 4 and sys.argv[4] != "gen":
        import gen_tf
        gen_case = {"tf": gen_tf.gen_case, "tf2": gen_tf.gen_case_w2,
                    "tf2big": lambda seed: gen_tf.gen_case2(seed, big=True)}[sys.argv[4]]
    signal.signal(signal.SIGALRM, _alarm)
    with open(out, "a") as f:
        for seed in range(start, start + count):
            signal.alarm(90)
            try:
                rec = run_case(seed)
            except Timeout:
                rec = dict(seed=seed, status="timeout")
            except Exception:
                rec = dict(seed=seed, status="harness_error", err=traceback.format_exc()[-800:])
            signal.alarm(0)
            f.write(json.dumps(rec) + "\n"); f.flush()
            print(seed, rec.get("status"), rec.get("family"), rec.get("secs"),
                  {k: v[2] for k, v in rec.get("ph", {}).items()}, flush=True)
