"""Experiment: the cuDNN RNN route against GPU truths, largest batch under a cap. ROUTE=off for the shipped path."""
import sys, os, contextlib, torch
sys.path.insert(0,'benchmarks'); sys.argv=['x']
import bench_cuda as bc
import bsselect.memory.cuda_rnn as cr
from bsselect.device import Budget
from bsselect.memory.probe import Method, run_probe
from bsselect.memory.targets import Target
MiB=2**20
caps={('packed lstm 2x512 seq<=512','fp32'):(5325,319),('gru-2x1024 seq64','fp32'):(2164,331),('gru-2x1024 seq64','bf16'):(1401,396)}
if os.environ.get('ROUTE')=='off':
    cr.cuda_rnn_policy = contextlib.nullcontext
    cr.routes = lambda m: False
cases=[]
bc.CASES='seq'; cases += [c for c in bc.seq_cases() if 'lstm' in c[0]]
bc.CASES='heldout'; bc.HELDOUT=True; cases += [c for c in bc.heldout_cases() if 'gru' in c[0]]
for name, sim_task, task, prec, tb, bs in cases:
    bc.CASES = 'seq' if 'lstm' in name else 'heldout'
    cap,truth=caps[(name,prec)]
    out=[]
    for m in (0.0,0.2):
        r=run_probe(sim_task, task_name=name, device=torch.device('cpu'), budget=Budget(cap*MiB,'cap'), method=Method.simulated, margin=m, target=Target.cuda, budget_is_total=False, settings=bc.settings_for(prec, False), inputs=bc.inputs_of(sim_task))
        out.append(r.max_batch)
    print(os.environ.get('ROUTE','on'), name, prec, 'cap', cap, 'truth', truth, 'sim m=0/0.2', out, '(%.2fx / %.2fx)'%(out[0]/truth, out[1]/truth))
