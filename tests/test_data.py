"""mnist_fast.data: the IDX reader, dataset lookup, normalization and the tensor batches,
on small IDX files written here."""
import dataclasses
import gzip

import pytest
import torch

from mnist_fast import data
from mnist_fast.data import Batches, DatasetNotFoundError, IdxError, Split, read_idx, write_idx


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


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_damaged_gzip_is_an_idx_error(tmp_path, damage):
    path = tmp_path / "bad-idx3-ubyte.gz"
    packed = gzip.compress(GOOD)
    path.write_bytes(packed[: len(packed) // 2] if damage == "cut" else b"\x1f\x8b" + b"junk" * 10)
    with pytest.raises(IdxError, match="cannot read"):
        read_idx(path)


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
    lesson = data.LessonBatches(split, batch_size=4, shuffle=False)
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
