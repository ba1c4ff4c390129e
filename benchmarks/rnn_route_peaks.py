"""Experiment (commit message says): the cuDNN RNN route against GPU truths, peaks. ROUTE=off for the shipped path."""
import sys, contextlib
sys.path.insert(0,'benchmarks'); sys.argv=['x']
import bench_cuda as bc
import bsselect.memory.cuda_rnn as cr
from bsselect.memory.simulated import simulate_step_peak
MB=1e6
truth={('packed lstm 2x512 seq<=512','fp32'):{8:318477312,32:718984704},
       ('gru-2x1024 seq64','fp32'):{16:380540928,64:635917824},
       ('gru-2x1024 seq64','bf16'):{16:318674944,64:445577728}}
route = sys.argv[-1] if len(sys.argv)>1 else 'on'
import os
if os.environ.get('ROUTE')=='off':
    cr.cuda_rnn_policy = contextlib.nullcontext
cases=[]
bc.CASES='seq'; cases += [c for c in bc.seq_cases() if 'lstm' in c[0]]
bc.CASES='heldout'; bc.HELDOUT=True; cases += [c for c in bc.heldout_cases() if 'gru' in c[0]]
for name, sim_task, task, prec, tb, bs in cases:
    bc.CASES = 'seq' if 'lstm' in name else 'heldout'
    for b in bs:
        p=simulate_step_peak(sim_task,b,kernel_workspace=False,settings=bc.settings_for(prec,True),inputs=bc.inputs_of(sim_task))
        t=truth[(name,prec)][b]
        print(os.environ.get('ROUTE','on'), name, prec, b, 'sim+64MiB %.1f MB  allocated %.1f MB  %+.1f%%'%((p.peak_bytes+64*2**20)/MB, t/MB, 100*((p.peak_bytes+64*2**20)/t-1)), p.peak_phase.value)
