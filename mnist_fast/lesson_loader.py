"""The lesson's input pipeline (torchvision DataLoader + ToTensor + Normalize((0.5,), (0.5,)), one
sample at a time), with the interface of mnist_fast.data.Batches. It is slow by design: `--loader
dataloader` and the benchmark's pipeline row use it to show what the whole-tensor path saves."""
import math

import torch
from torch import Tensor

from .data import Split, _epoch_generator

__all__ = ["LessonBatches"]


class _LessonDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST does per sample: uint8 image -> PIL image -> transforms."""

    def __init__(self, images_u8: Tensor, labels: Tensor):
        from torchvision import transforms

        self.images_u8, self.labels = images_u8, labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images_u8[index].numpy())), int(self.labels[index])


class LessonBatches:
    """The lesson's DataLoader + transforms pipeline over a Split, with Batches' interface
    (single process, CPU tensors out). Slow: it is here to measure what the tensor path saves."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool = True, seed: int = 0):
        # Undo the normalization so that both paths see exactly the same pixels.
        images_u8 = ((split.images.squeeze(1).cpu() * 0.5 + 0.5) * 255).round_().to(torch.uint8)
        self.dataset = _LessonDataset(images_u8, split.labels.cpu())
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self):
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                                             generator=_epoch_generator(self.seed, self.epoch))
        return iter(loader)
