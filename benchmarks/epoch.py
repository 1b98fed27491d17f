"""Epoch time of MNIST training (784-128-64-10, SGD lr 0.01 momentum 0.9, shuffled batches), each
contender in the same process, interleaved round by round, medians.

    taskset -c 0 python benchmarks/epoch.py --threads 1 [--batch 64] [--rounds 7] [--jax-python PATH]

Rows (one epoch: draw the shuffle, gather every batch, train on it):
  stock eager       nn.Sequential + nn.CrossEntropyLoss + torch.optim.SGD over data.Batches (--backend stock)
  torch.compile     the same, as PyTorch's recipes compile it: the model's forward with its loss in
                    one torch.compile'd function (its backward compiled by AOTAutograd) and
                    opt.step under torch.compile too (Inductor's C++ code for the SGD update); the
                    last, smaller batch is a second graph, compiled in the warm-up (--no-compile
                    skips the row: compiling takes ~20 s on this project's 2-CPU VMs)
  fused-step loop   FusedTrainer.step over data.Batches (--backend fused-step before fit_epoch)
  fit_epoch         FusedTrainer.fit_epoch, 100 steps per call, from the uint8 pixels with
                    data.pixel_values() (what --backend fused-step runs now)
  fit_epoch 1 call  the same, the whole epoch in one call
  GEMM floor        the 8 GEMMs of a step alone (torch.mm into preallocated outputs) x steps
  compute ceiling   a fixed amount of large-GEMM work (60 torch.mm of 512x512 matrices): how much the
                    machine's cores give at this thread count during this run; its 1-thread / N-thread
                    ratio bounds any N-thread speedup (on a VM whose cores are shared with other tenants,
                    it is well below N at times)
  JAX lax.scan      the whole epoch as one jax.jit'ed lax.scan, shuffle and gather inside, same init
                    ranges (U(+-1/sqrt(fan_in))) and recipe; only when jax imports, in this
                    interpreter or in the one given by --jax-python (a worker process that
                    runs one epoch per round, so it is interleaved with the others too; XLA is
                    held to one thread with --threads 1 and left to its default, every core, else)

Denormals: XLA computes on the CPU with denormal floats flushed to zero (FTZ/DAZ), PyTorch with
IEEE denormals unless torch.set_flush_denormal(True). They matter here: the momentum buffers of
ReLU units that stopped firing decay into denormals (0.9 * b, stuck at the smallest one), and each
vector op on them takes a microcode assist. --flush-denormal runs every torch contender in XLA's
mode, for a like-for-like JAX row; without it they run in PyTorch's default.

Data: real MNIST when mnist_fast.data finds it (no download), else 60000 synthetic images.
Clock: 'process' (default) is the CPU time of the whole process (time.process_time): with
--threads 1 it is the thread time of the one torch thread, and it also counts XLA's worker
threads, which time.thread_time of the caller would miss; it leaves out time spent waiting for a
core, so it suits a shared machine when the run is pinned (taskset -c 0). 'wall' is perf_counter.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mnist_fast

SIZES = (784, 128, 64, 10)
LR, MOMENTUM = 0.01, 0.9
CLOCKS = {"process": time.process_time, "wall": time.perf_counter}


# ----------------------------------------------------------------------------------------------
# JAX (imports only jax and numpy: it also runs as a worker under a venv without torch)

def jax_epoch_runner(images_u8, labels, batch, seed=0):
    """A function that runs one epoch and blocks until it is done; the first call compiles."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray((images_u8.reshape(images_u8.shape[0], -1).astype(np.float32) / 255 - 0.5) / 0.5)
    y = jnp.asarray(labels.astype(np.int32))
    n = x.shape[0]
    full, rest = divmod(n, batch)
    key = jax.random.PRNGKey(seed)
    params = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):  # nn.Linear's default init ranges
        key, kw, kb = jax.random.split(key, 3)
        bound = 1 / np.sqrt(fan_in)
        params.append((jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
                       jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)))
    buffers = jax.tree_util.tree_map(jnp.zeros_like, params)

    def loss_fn(p, xb, yb):
        h = xb
        for w, b in p[:-1]:
            h = jax.nn.relu(h @ w + b)
        logits = h @ p[-1][0] + p[-1][1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    @jax.jit
    def epoch(p, bufs, xs, ys, k):
        def step(carry, index):  # torch.optim.SGD: buf = momentum * buf + grad (from 0), p -= lr * buf
            p, bufs = carry
            loss, g = jax.value_and_grad(loss_fn)(p, xs[index], ys[index])  # the gather, inside the jit
            bufs = jax.tree_util.tree_map(lambda b, gi: MOMENTUM * b + gi, bufs, g)
            p = jax.tree_util.tree_map(lambda pi, b: pi - LR * b, p, bufs)
            return (p, bufs), loss

        perm = jax.random.permutation(k, n)
        carry, losses = jax.lax.scan(step, (p, bufs), perm[:full * batch].reshape(full, batch))
        if rest:  # the last, smaller batch, as the torch loops do
            carry, last = step(carry, perm[full * batch:])
            losses = jnp.concatenate([losses, last[None]])
        return carry[0], carry[1], losses

    state = {"p": params, "b": buffers, "key": jax.random.PRNGKey(seed + 1)}

    def run():
        state["key"], k = jax.random.split(state["key"])
        state["p"], state["b"], losses = epoch(state["p"], state["b"], x, y, k)
        losses.block_until_ready()
        return float(losses[-1])
    return run


def jax_worker(data_file, batch, clock):
    """Reads 'epoch' lines on stdin, answers each with the epoch's time on stdout."""
    import numpy as np

    data = np.load(data_file)
    run = jax_epoch_runner(data["images"], data["labels"], batch)
    timer = CLOCKS[clock]
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "epoch":
            break
        t0 = timer()
        run()
        print(timer() - t0, flush=True)


class JaxWorker:
    def __init__(self, python, data_file, batch, clock, threads):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if threads == 1:  # else XLA's own default: every core
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--jax-worker", data_file,
                                      "--batch", str(batch), "--clock", clock],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready", "the JAX worker did not start"

    def epoch(self):
        self.proc.stdin.write("epoch\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------------------------
# torch

def torch_contenders(images, labels, pixels, batch, compile=True):
    import torch
    from torch import nn

    from mnist_fast import data as mnist_data
    from benchmarks.cases import make_step_gemms
    from mnist_fast.models import MNISTNet, stock_mlp
    from mnist_fast.trainer import FusedTrainer

    split = mnist_data.Split(images, labels, pixels)
    pixel_values = mnist_data.pixel_values()

    def epochs():  # each contender draws its own shuffle per epoch, as the CLI does
        batches = mnist_data.Batches(split, batch, seed=0)
        count = iter(range(10 ** 9))

        def next_epoch():
            batches.set_epoch(next(count))
            return batches
        return next_epoch

    loss_fn = nn.CrossEntropyLoss()

    def stock_epochs(compiled):
        torch.manual_seed(0)  # the initial weights of the MNISTNet of trainer_epochs
        model = nn.Sequential(nn.Flatten(), *stock_mlp())
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        forward_loss, optimizer_step = (lambda x, y: loss_fn(model(x), y)), optimizer.step
        if compiled:
            forward_loss = torch.compile(forward_loss, dynamic=False)
            # opt.step reads lr and momentum as Python floats: compiled once, they are constants
            optimizer_step = torch.compile(optimizer_step, dynamic=False)
        next_epoch = epochs()

        def epoch():
            for x, y in next_epoch():
                loss = forward_loss(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer_step()
        return epoch

    def trainer_epochs(run):
        torch.manual_seed(0)
        trainer = FusedTrainer(MNISTNet(), lr=LR, momentum=MOMENTUM)
        next_epoch = epochs()
        return lambda: run(trainer, next_epoch())

    def loop(trainer, batches):
        for x, y in batches:
            trainer.step(x, y)

    def fit(chunk):
        # as the CLI: from the uint8 pixels (a quarter of the bytes to gather), the same training
        return lambda trainer, b: trainer.fit_epoch(split.pixels, split.labels, batch, order=b.indices(), chunk=chunk,
                                                    pixel_values=pixel_values)

    gemms = make_step_gemms(batch)
    steps = -(-images.shape[0] // batch)

    def gemm_floor():
        for _ in range(steps):
            gemms()

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    c = torch.empty(512, 512)

    def compute_ceiling():
        for _ in range(60):
            torch.mm(a, b, out=c)

    return {
        "stock eager": stock_epochs(compiled=False),
        **({"torch.compile": stock_epochs(compiled=True)} if compile else {}),
        "fused-step loop": trainer_epochs(loop),
        "fit_epoch": trainer_epochs(fit(100)),
        "fit_epoch 1 call": trainer_epochs(fit(None)),
        "GEMM floor": gemm_floor,
        "compute ceiling": compute_ceiling,
    }


def load_data(samples):
    """(images (N, 1, 28, 28) float32 normalized, labels int64, uint8 images, description)."""
    import torch

    from mnist_fast import data as mnist_data

    try:
        dataset = mnist_data.load_dataset("mnist", download=False)
        images, labels = dataset.train.images, dataset.train.labels
        raw = dataset.train.pixels
        what = f"real MNIST from {dataset.source}"
    except Exception as error:  # no copy on this machine: synthetic, the same shapes
        g = torch.Generator().manual_seed(2)
        raw = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (60000,), generator=g)
        images = mnist_data.normalize(raw).unsqueeze(1)
        what = f"synthetic ({type(error).__name__}: no MNIST found)"
    if samples:
        images, labels, raw = images[:samples], labels[:samples], raw[:samples]
    return images.contiguous(), labels, raw, what


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs of each contender")
    parser.add_argument("--samples", type=int, default=None, help="use only the first N training samples")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
    parser.add_argument("--jax-python", default=None,
                        help="a Python with jax installed, for the JAX row when jax is not importable here")
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) for the torch contenders (XLA's mode: see above)")
    parser.add_argument("--out-json", default=None)
    parser.add_argument("--jax-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jax_worker:
        return jax_worker(args.jax_worker, args.batch, args.clock)

    import numpy as np
    import torch

    if args.flush_denormal and not torch.set_flush_denormal(True):
        parser.error("--flush-denormal: this CPU cannot flush denormals")
    if args.threads:  # (after the mode: the intra-op threads start in it)
        torch.set_num_threads(args.threads)
    images, labels, raw, what = load_data(args.samples)
    fns = torch_contenders(images, labels, raw, args.batch, compile=not args.no_compile)

    jax = None
    if not args.no_jax:
        python = args.jax_python
        if python is None:
            try:
                import jax as _  # noqa: F401
                python = sys.executable
            except ImportError:
                pass
        if python is not None:
            data_file = os.path.join(tempfile.mkdtemp(), "mnist.npz")
            np.savez(data_file, images=raw.numpy(), labels=labels.numpy())
            jax = JaxWorker(python, data_file, args.batch, args.clock, torch.get_num_threads())

    timer = CLOCKS[args.clock]
    names = list(fns) + (["JAX lax.scan"] if jax else [])

    def run(name):
        if name == "JAX lax.scan":
            return jax.epoch()
        t0 = timer()
        fns[name]()
        return timer() - t0

    for name in names:  # warm-up (JAX: the compilation)
        run(name)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(run(name))
    if jax:
        jax.close()

    steps = -(-images.shape[0] // args.batch)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{images.shape[0]} samples ({what}), batch {args.batch}, {steps} steps, "
          f"{torch.get_num_threads()} torch thread(s), {args.rounds} interleaved rounds, {args.clock} clock, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch's denormals {'flushed' if args.flush_denormal else 'IEEE'} (JAX's flushed), load {os.getloadavg()[0]:.1f}\n")
    base = medians["fused-step loop"]
    print(f"| contender | epoch (median) | min..max | per step | vs fused-step loop |")
    print(f"|---|---:|---:|---:|---:|")
    for name in names:
        t = times[name]
        print(f"| {name} | {medians[name]:.3f} s | {min(t):.3f}..{max(t):.3f} | {1e6 * medians[name] / steps:.0f} us "
              f"| {base / medians[name]:.2f}x |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"config": vars(args), "data": what, "steps": steps, "times_s": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
