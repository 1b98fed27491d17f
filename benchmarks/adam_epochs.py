"""Adam epochs: FusedTrainer.fit_epoch(optimizer="adam"|"adamw") against the stock loop with
torch.optim.Adam/AdamW, on real MNIST, in one process (epoch by epoch in turn, then from one saved
state with IEEE and with flushed denormals). Process CPU time; pin it:

    taskset -c 0 python benchmarks/adam_epochs.py [adam|adamw]
"""
import sys, torch, time, copy
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mnist_fast
from mnist_fast import data, models
from mnist_fast.trainer import FusedTrainer
torch.set_num_threads(1)
ds = data.load_dataset("mnist", download=False)
X = data.normalize(ds.train.images) if ds.train.images.dtype == torch.uint8 else ds.train.images
Y = ds.train.labels
opt_name = sys.argv[1] if len(sys.argv) > 1 else "adam"
torch.manual_seed(0)
fused = models.MNISTNet()
stock = mnist_fast.unfuse(copy.deepcopy(fused))
Opt = torch.optim.AdamW if opt_name == "adamw" else torch.optim.Adam
opt = Opt(stock.parameters(), lr=1e-3)
trainer = FusedTrainer(fused, lr=1e-3, optimizer=opt_name)
crit = torch.nn.CrossEntropyLoss()
def denormals(state):
    return sum(((st["exp_avg"] != 0) & (st["exp_avg"].abs() < 2**-126)).sum().item() for st in state.values())
def stock_epoch(order):
    t = time.process_time()
    for s in range(0, len(order), 64):
        idx = order[s:s+64]
        loss = crit(stock(X[idx].flatten(1)), Y[idx]); opt.zero_grad(); loss.backward(); opt.step()
    return time.process_time() - t
def fused_epoch(order):
    t = time.process_time(); trainer.fit_epoch(X, Y, 64, order=order); return time.process_time() - t
print(f"# {opt_name} lr 1e-3, batch 64, 1 thread, {torch.backends.cpu.get_cpu_capability()}, process CPU time")
for e in range(4):
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(e))
    ts = stock_epoch(order); tf = fused_epoch(order)
    print(f"epoch {e} IEEE: stock loop {ts:.3f} s, fit_epoch {tf:.3f} s ({ts/tf:.2f}x); denormal exp_avg entries: stock {denormals(opt.state)}, fused {denormals(trainer.state)}", flush=True)
# same state, same order: IEEE vs flushed
order = torch.randperm(len(X), generator=torch.Generator().manual_seed(99))
saved = (copy.deepcopy(stock.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(fused.state_dict()), copy.deepcopy(trainer.state_dict()))
for flush in (False, True, False, True):
    stock.load_state_dict(saved[0]); opt.load_state_dict(saved[1]); fused.load_state_dict(saved[2]); trainer.load_state_dict(saved[3])
    torch.set_flush_denormal(flush)
    ts = stock_epoch(order); tf = fused_epoch(order)
    torch.set_flush_denormal(False)
    print(f"from epoch-4 state, {'flushed' if flush else 'IEEE   '}: stock loop {ts:.3f} s, fit_epoch {tf:.3f} s ({ts/tf:.2f}x)", flush=True)
