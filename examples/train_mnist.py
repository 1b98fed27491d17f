"""The lesson's MNIST training loop, with mnist_fast's fused layers and its whole-tensor batches.

    python examples/train_mnist.py                            # MNIST (downloaded if missing)
    python examples/train_mnist.py --dataset fashion-mnist    # Debian: apt-get install dataset-fashion-mnist

For checkpoints, plots, the stock-vs-fused comparison and several processes, use
`python -m mnist_fast.train --help`.
"""
import argparse

import torch
from torch import nn, optim

import mnist_fast
from mnist_fast.data import Batches, load_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
parser.add_argument("--data-dir", default=None, help="folder with the IDX files")
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)  # for a model this small, more threads cost more than they give

# Both splits, normalized once like transforms.Normalize((0.5,), (0.5,)), as whole tensors.
data = load_dataset(args.dataset, args.data_dir, announce=print)  # announce: a line if it downloads
trainloader = Batches(data.train, batch_size=64, seed=0)  # shuffled batches, cut by indexing

# The lesson's model and loss. fuse() turns every Linear followed by a ReLU into one LinearReLU
# (same parameters); the fused CrossEntropyLoss takes the logits (log-softmax + NLL in one op).
model = mnist_fast.fuse(nn.Sequential(nn.Linear(784, 128), nn.ReLU(),
                                      nn.Linear(128, 64), nn.ReLU(),
                                      nn.Linear(64, 10)))
criterion = mnist_fast.CrossEntropyLoss()
optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

for epoch in range(args.epochs):
    trainloader.set_epoch(epoch)  # a new shuffle every epoch
    running_loss = 0.0
    for images, labels in trainloader:
        images = images.view(images.shape[0], -1)  # flatten 1x28x28 to 784

        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()

        running_loss += loss.item()

    with torch.no_grad():
        logits = model(data.test.images.view(len(data.test), -1))
        accuracy = (logits.argmax(dim=1) == data.test.labels).float().mean().item()
    print(f"epoch {epoch + 1}: training loss {running_loss / len(trainloader):.4f}, "
          f"test accuracy {accuracy:.2%}")
