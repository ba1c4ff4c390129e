"""Experiment: the routed forward's saved bytes against live_after_forward on the H200 (96 configurations)."""
import json, sys, torch
from bsselect.memory.simulated import LiveStorageCounter, _fake_mode, to_fake_cpu, cuda_rules_of
from bsselect.step import StepSettings
from bsselect.precision import Precision
from bsselect.memory.values import RealWhereKnown
d=json.load(open('benchmarks/results/cudnn-rnn-h200.json'))
worst=0
for r in d['rows']:
    if 'calls' not in r: continue
    mode,L,I,H,T,B,packed,bi,prec=r['mode'],r['layers'],r['input'],r['hidden'],r['T'],r['B'],r['packed'],r['bidirectional'],r['precision']
    torch.manual_seed(0)
    fm=_fake_mode()
    with torch.device('meta'):
        rnn=getattr(torch.nn,mode)(I,H,num_layers=L,batch_first=True,bidirectional=bi)
    to_fake_cpu(rnn, fm)
    settings=StepSettings(precision=Precision(prec), target_device='cuda')
    g=torch.Generator().manual_seed(1)
    lengths=torch.randint(max(1,T//8),T+1,(B,),generator=g); lengths[0]=T
    counter=LiveStorageCounter()
    with cuda_rules_of(settings), fm, RealWhereKnown():
        x=torch.randn(B,T,I,requires_grad=True)
        ctx=torch.autocast('cpu',dtype=torch.bfloat16) if prec=='bf16' else torch.autocast('cpu',enabled=False)
        with counter:
            before=counter.live_bytes
            with ctx:
                xs=torch.nn.utils.rnn.pack_padded_sequence(x,lengths,batch_first=True,enforce_sorted=False) if packed else x
                base=counter.live_bytes
                y=rnn(xs)[0]
            data=y.data if packed else y
            fwd=counter.live_bytes-base
    gpu=r['live_after_forward']
    # gpu base excludes x but includes packing? base taken before packing on GPU: subtract packed data copy
    print(mode,L,I,H,T,B,int(packed),int(bi),prec, 'sim %.2f MB gpu %.2f MB ratio %.3f'%(fwd/1e6,gpu/1e6,fwd/gpu), r['split'])
