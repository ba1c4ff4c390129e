"""Replay a critical-batch pick rule on saved sweeps (no training; session 15, not shipped).

    cd benchmarks/results && PYTHONPATH=../.. python3 ../replay_crit_rule.py train \
        sweep-b2-old-ws0-6a8349b.json.gz sweep-b2-fresh-ws0-6a8349b.json.gz \
        sweep-b2-fresh2-ws0-6a8349b.json.gz sweep-fresh3-40cf877.json.gz

Merrill et al. (2025) define the critical batch size as the largest batch whose loss at equal
samples stays within a tolerance of the smallest batch's. Read at the end of the sweep's
equal-sample trials: the largest ok batch whose training-loss drop is at least (1 - tol) of
the best drop, then among the batches up to it the fastest per sample at the oracle's robust
step times. Scored on the real sweeps and on the trials emulated at 1/2..4x the budget, for
several tolerances; prints each column's median and worst of the tasks' worst regret.
"""
import statistics
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_lib as lib
from bench_selection import read_json

def crit_pick(trials, tol, step_t, use='train'):
    ok = [t for t in trials if t.ok and t.train_loss_end is not None]
    if not ok: return None
    if use == 'train':
        drop = {t.batch_size: t.train_loss_start - t.train_loss_end for t in ok}
    else:
        drop = {t.batch_size: (t.train_loss_start - t.val_loss) if t.val_loss is not None else -1 for t in ok}
    best = max(drop.values())
    if best <= 0: return None
    within = [b for b, d in drop.items() if d >= (1 - tol) * best]
    crit = max(within)
    cands = [b for b in drop if b <= crit and drop[b] > 0]
    # fastest per sample among b <= crit
    return min(cands, key=lambda b: step_t[b] / b)

def main(tols=(0.02, 0.05, 0.1, 0.2), use='train'):
    res = {}
    for path in sys.argv[1:]:
        for ex in read_json(Path(path))['examples']:
            times = lib.oracle_times(ex)
            step_t = {int(b): v['cpu_s'] for b, v in ex['timing'].items()}
            for tol in tols:
                row = {}
                real = [crit_pick(lib.trials_from_sweep(sw['result']), tol, step_t, use) for sw in ex['sweeps']]
                row['real'] = real
                for frac in ex['fractions']:
                    row['x'+frac] = [crit_pick(lib.emulated_trials(ex, i, frac, step_t), tol, step_t, use) for i in range(len(ex['runs']))]
                res.setdefault(tol, {})[ex['name']] = {k: (v, max(lib.regret(times, p) for p in v)) for k, v in row.items()}
    for tol, by in res.items():
        print(f'## tol {tol} ({use})')
        cols = list(next(iter(by.values())).keys())
        for c in cols:
            w = {n: r[c][1] for n, r in by.items()}
            print(f'  {c}: median {statistics.median(w.values()):.2f} worst {max(w.values()):.2f} above1.25 {sorted(n for n,x in w.items() if x>1.25)}')
        print('   ', {n: (sorted(set(r["real"][0])), round(r["real"][1], 2)) for n, r in by.items()})

if __name__ == '__main__':
    main(use=sys.argv.pop(1) if sys.argv[1] in ('train', 'val') else 'train')
