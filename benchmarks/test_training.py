"""Training benchmarks: one SGD train step of the 784-128-64-10 network at each batch size, an
epoch over 60k synthetic MNIST-shaped samples held in memory, and the lesson's DataLoader +
transforms pipeline for reference (the data pipeline, not the model, bounds that one). Also the
activation memory a train step saves for backward, reported in extra_info."""
import pytest

from benchmarks import cases
from benchmarks.cases import warm


def test_train_step(benchmark, impl, batch, dtype):
    run = warm(cases.make_train_step(impl, batch, dtype))
    benchmark.group = f"train step batch {batch} {dtype}"
    if not impl.endswith("compiled"):
        benchmark.extra_info["saved_activation_bytes"] = cases.saved_activation_bytes(impl, batch, dtype)["activations"]
    benchmark(run)


@pytest.mark.parametrize("impl", ["fused_step"])
@pytest.mark.parametrize("batch", [1, 64, 256, 1024, 4096])
def test_train_step_fused_trainer(benchmark, impl, batch):
    """The whole step as one op (mnist_fast.FusedTrainer), in the float32 train-step group."""
    run = warm(cases.make_train_step(impl, batch))
    benchmark.group = f"train step batch {batch} float32"
    benchmark(run)


def test_train_step_gemms(benchmark, batch, dtype):
    """The step's eight GEMMs alone, in the train-step group: the floor no per-op fusion removes."""
    run = warm(cases.make_step_gemms(batch, dtype))
    benchmark.group = f"train step batch {batch} {dtype}"
    benchmark.extra_info["impl"] = "the step's GEMMs alone"
    benchmark(run)


@pytest.mark.parametrize("impl", ["ours", "stock", "fused_step"])
def test_epoch(benchmark, impl, epoch_samples):
    run = cases.make_epoch(impl, epoch_samples)
    benchmark.group = f"epoch {epoch_samples} samples in memory, batch 64 float32"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["ours", "stock"])
def test_epoch_dataloader_pipeline(benchmark, impl, epoch_samples):
    pytest.importorskip("torchvision")
    run = cases.make_pipeline_epoch(impl, epoch_samples)
    benchmark.group = f"epoch {epoch_samples} samples DataLoader+ToTensor+Normalize, batch 64 float32"
    benchmark.pedantic(run, rounds=2, warmup_rounds=0)


@pytest.mark.parametrize("impl", ["ours", "stock"])
@pytest.mark.parametrize("batch", [64, 1024])
def test_saved_activation_memory(benchmark, impl, batch):
    """Saved-for-backward bytes of a float32 train step (extra_info); the timing is of the count."""
    benchmark.group = f"saved activations of a train step, batch {batch}"
    counts = benchmark.pedantic(cases.saved_activation_bytes, args=(impl, batch), rounds=1)
    benchmark.extra_info.update(counts)
    benchmark.extra_info["peak_fwd_bwd_bytes"] = cases.peak_step_bytes(impl, batch)
    assert counts["activations"] > 0
