"""Smoke test of an installed mnist_fast (run from outside the source tree): the package imports from
site-packages, ships its metadata, and its ops agree with stock PyTorch."""
import importlib.metadata as metadata
import pathlib
import sys

import torch
import torch.nn.functional as F

import mnist_fast
from mnist_fast import functional as MF

package_dir = pathlib.Path(mnist_fast.__file__).parent
if "site-packages" not in package_dir.parts:
    sys.exit(f"mnist_fast was imported from {package_dir}, not from an installed copy")
if not (package_dir / "py.typed").is_file():
    sys.exit("py.typed is missing from the installed package")

dist = metadata.distribution("mnist_fast")
requires = dist.requires or []
torch_pins = [r for r in requires if r.replace(" ", "").startswith("torch==")]
release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
if torch_pins != [f"torch=={release}.*"]:
    sys.exit(f"expected the wheel to pin torch=={release}.*, it declares {requires}")
if not any(pathlib.PurePath(str(f)).name == "LICENSE" for f in dist.files or []):
    sys.exit("LICENSE is not in the installed metadata")

# One OpenMP runtime in the process: the extension shares torch's libgomp (a vendored copy would
# bring a second thread pool that competes with torch's for the cores).
if sys.platform == "linux":
    maps = pathlib.Path("/proc/self/maps").read_text().splitlines()
    gomp = sorted({line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]})
    if len(gomp) > 1:
        sys.exit(f"more than one OpenMP runtime is loaded: {gomp}")

torch.manual_seed(0)
x = torch.randn(8, 784, requires_grad=True)
w = torch.randn(128, 784, requires_grad=True)
b = torch.randn(128, requires_grad=True)
y = MF.linear_relu(x, w, b)
torch.testing.assert_close(y, torch.relu(F.linear(x, w, b)))
logits = torch.randn(8, 10, requires_grad=True)
target = torch.randint(0, 10, (8,))
loss = MF.cross_entropy(logits, target)
torch.testing.assert_close(loss, F.cross_entropy(logits, target))
loss.backward()
try:
    MF.cross_entropy(logits, torch.full((8,), 10))
except IndexError:
    pass
else:
    sys.exit("an out-of-range class index did not raise IndexError")
net = mnist_fast.models.MNISTNet()
trainer = mnist_fast.FusedTrainer(net, lr=0.01, momentum=0.9)
trainer.step(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
print(f"smoke test passed: mnist_fast {mnist_fast.__version__} from {package_dir}, "
      f"cuda_compiled={mnist_fast.cuda_compiled()}, requires {', '.join(requires)}")
