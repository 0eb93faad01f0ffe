# section 47c: R_c on a conv input as a 1x1 conv against the same matmul on a channels-last view, forward and
# forward + backward (grad of the input), at the input shapes of resnet18 at 64 px. python docs/bench_s47/input_side_1x1.py
import torch, time, torch.nn.functional as F
torch.manual_seed(0)
def t(fn, reps=30):
    for _ in range(3): fn()
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    ts.sort(); return ts[len(ts)//2]*1e3
for (B,c,H,W) in [(64,512,2,2),(64,256,4,4),(64,512,4,4),(64,128,8,8),(128,512,2,2),(64,256,8,8)]:
    x=torch.randn(B,c,H,W,requires_grad=True); R=torch.randn(c,c)
    k=R[:,:,None,None]
    def conv_f(): return F.conv2d(x,k)
    def mm_f(): return (x.permute(0,2,3,1).reshape(-1,c) @ R.T).view(B,H,W,c).permute(0,3,1,2)
    def mm_fc(): return mm_f().contiguous()
    g=torch.randn(B,c,H,W)
    def conv_fb(): y=conv_f(); y.backward(g)
    def mm_fb(): y=mm_fc(); y.backward(g)
    a=conv_f(); b=mm_fc(); err=(a-b).abs().max().item()
    print((B,c,H,W), 'fwd conv %.2f mm %.2f mm+contig %.2f | fwd+bwd conv %.2f mm %.2f | err %.1e' % (t(conv_f),t(mm_f),t(mm_fc),t(conv_fb),t(mm_fb),err))
