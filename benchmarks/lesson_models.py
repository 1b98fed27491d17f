"""The lesson's class-based network, written as a user writes it: a case of the user-loop benchmark
(user_loop.py) and a form that tests/test_fused_mlp_nn.py checks mnist_fast.fuse() turns into one op."""
import torch.nn.functional as F
from torch import nn


class Classifier(nn.Module):
    """The lesson's class-based network, 784-256-128-64-10 with F.relu and an F.log_softmax output."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 64)
        self.fc4 = nn.Linear(64, 10)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        return F.log_softmax(self.fc4(x), dim=1)
