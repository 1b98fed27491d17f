"""The CUDA kernels of csrc/cuda/, run on the CPU under an emulation of the CUDA execution model.

No GPU is needed: each .cu file is compiled with the host compiler against tests/cuda_emu/emu_cuda.h
(threads as fibers; __syncthreads and warp shuffles as rendezvous points; launches checked for
empty grids, grid-size limits and block sizes), with its kernel launches rewritten to emulator
calls, and its host functions are called on CPU tensors. Results are compared with the CPU kernels
and a float64 reference. This covers the CUDA-only part of the code -- grid shapes, warp-group
shuffles, block reductions, partial sums, bounds checks -- that tests/test_cuda.py can only
exercise on a GPU. It checks logic, not memory ordering or speed.

The first run compiles two small modules (about two minutes on two cores); later runs reuse them.
"""
import math
import pathlib
import re

import pytest
import torch

import mnist_fast  # noqa: F401  (the CPU kernels the emulated ones are compared with)

from helpers import DTYPES, assert_close

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMU_HEADER = ROOT / "tests" / "cuda_emu" / "emu_cuda.h"
BUILD = ROOT / "build" / "cuda_emu"
OPS = torch.ops.mnist_fast

# One translation unit per .cu file, as in the real build; the train step calls into the other two.
WRAPPER = """\
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/record_function.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>
#include <algorithm>
#include <limits>
#include <cmath>
#include "{header}"
{project_headers}
#include "{source}"
"""

MODULE = """\
#include <torch/extension.h>
#include "{header}"
namespace mnist_fast {{
{declarations}
}}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{
{registrations}
  m.def("asserts", [] {{ int n = emu::g_asserts; emu::g_asserts = 0; return n; }});
}}
"""

CU_FILES = ["linear_relu", "cross_entropy", "train_step"]
PROJECT_HEADERS = ["checks.h", "linear_relu_impl.h", "cross_entropy_impl.h", "train_step_impl.h", "cuda/kernels.cuh"]


def _split_top_level(text):
    parts, depth, current = [], 0, ""
    for c in text:
        depth += c in "(<[{"
        depth -= c in ")>]}"
        if c == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += c
    return parts + [current.strip()]


def emulated_source(cu_text, name):
    """A .cu file rewritten for the emulator: no includes (WRAPPER includes the project headers), launches as emu::launch, the
    TORCH_LIBRARY_IMPL block as a function emu_register_<name> that registers the kernels with pybind11."""
    text = "\n".join(line for line in cu_text.split("\n") if not line.startswith("#include"))
    text = text.replace("TORCH_LIBRARY_IMPL(mnist_fast, CUDA, m)", f"void emu_register_{name}(pybind11::module_& m)")
    if re.search(r"TORCH_FN\(\w+<", text):  # a template impl taking TensorList: pybind11 wants a std::vector
        text = EMU_ADAPT + re.sub(r'm\.impl\("(\w+)", TORCH_FN\(([\w<>:]+)\)\)', r'm.def("\1", emu_adapt<&\2>(&\2))',
                                  text)
    else:
        text = re.sub(r'm\.impl\("(\w+)", TORCH_FN\(([\w<>:]+)\)\)', r'm.def("\1", &\2)', text)
    return _launches_rewritten(text)


# Each kernel of a file with TensorList arguments is def'ed through this.
EMU_ADAPT = """\
template <typename T> struct emu_arg { using type = T; };
template <> struct emu_arg<at::TensorList> { using type = std::vector<at::Tensor>; };
template <auto F, typename R, typename... A>
auto emu_adapt(R (*)(A...)) { return [](typename emu_arg<A>::type... a) { return F(a...); }; }
"""


def _launches_rewritten(text):
    out, pos = [], 0
    while (start := text.find("<<<", pos)) >= 0:
        # The kernel expression before <<<: an identifier with template arguments.
        end_name = start
        while text[end_name - 1].isspace():
            end_name -= 1
        begin, depth = end_name, 0
        while True:
            c = text[begin - 1]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
            elif depth == 0 and not (c.isalnum() or c in "_:"):
                break
            begin -= 1
        close = text.find(">>>", start)
        grid, block = _split_top_level(text[start + 3:close])[:2]
        assert text[close + 3] == "(", "a launch's arguments must follow >>> directly"
        out.append(f"{text[pos:begin]}emu::launch({text[begin:end_name]}, {grid}, {block}, ")
        pos = close + 4
    out.append(text[pos:])
    return "".join(out)


def _write_if_changed(path, text):
    # An unchanged file keeps its mtime, so ninja does not recompile it.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _build():
    from torch.utils.cpp_extension import load

    directory = BUILD / "all"
    directory.mkdir(parents=True, exist_ok=True)
    headers = "\n".join(f'#include "{ROOT / "csrc" / h}"' for h in PROJECT_HEADERS)
    sources = []
    for name in CU_FILES:
        source = directory / f"{name}.inc"
        _write_if_changed(source, emulated_source((ROOT / "csrc" / "cuda" / f"{name}.cu").read_text(), name))
        wrapper = directory / f"{name}_emu.cpp"
        _write_if_changed(wrapper, WRAPPER.format(header=EMU_HEADER, project_headers=headers, source=source))
        sources.append(str(wrapper))
    module = directory / "module.cpp"
    _write_if_changed(module, MODULE.format(
        header=EMU_HEADER,
        declarations="\n".join(f"void emu_register_{name}(pybind11::module_& m);" for name in CU_FILES),
        registrations="\n".join(f"  mnist_fast::emu_register_{name}(m);" for name in CU_FILES)))
    return load(name="mnist_fast_emu", sources=sources + [str(module)], build_directory=str(directory),
                extra_cflags=["-O1", "-std=c++20"], verbose=False)


@pytest.fixture(scope="module")
def emu():
    return _build()


@pytest.fixture(scope="module")
def lr(emu):
    return emu


@pytest.fixture(scope="module")
def ce(emu):
    return emu


@pytest.fixture(autouse=True)
def _no_grad():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


# ---- linear_relu ----

LINEAR_SHAPES = [((64, 30), 128, True), ((300, 7), 100, True), ((130, 3), 40, True), ((3, 5, 7), 33, False),
                 ((7,), 4, True), ((1, 1), 1, True), ((0, 5), 6, True), ((5, 0), 3, True), ((4, 6), 0, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_relu_emulated(lr, dtype):
    for shape, out_features, has_bias in LINEAR_SHAPES:
        x = torch.randn(shape, dtype=dtype)
        w = torch.randn(out_features, shape[-1], dtype=dtype)
        b = torch.randn(out_features, dtype=dtype) if has_bias else None
        y = lr.linear_relu(x, w, b)
        x2 = x.double().reshape(math.prod(shape[:-1]), shape[-1])
        ref = torch.relu(x2 @ w.double().T + (b.double() if has_bias else 0))
        what = f"{dtype} {shape} -> {out_features}"
        assert_close(y, ref.to(dtype).reshape(y.shape), dtype, "forward " + what)
        # A dense grad and a stride-0 one; the ReLU mask is the kernel's own output's.
        for g in (torch.randn_like(y), torch.ones((), dtype=dtype).expand_as(y)):
            grad_pre = g.double().reshape(ref.shape) * (y.double().reshape(ref.shape) > 0)
            want = [(grad_pre @ w.double()).to(dtype).reshape(x.shape), (grad_pre.T @ x2).to(dtype),
                    grad_pre.sum(0).to(dtype)]
            for mask in ([True, True, True], [False, False, True], [True, False, False]):
                got = lr._linear_relu_backward(g, x, w, y, mask)
                for wanted, a, b_ in zip(mask, got, want):
                    if wanted:
                        assert_close(a, b_, dtype, f"backward {what} {mask}")
                    else:
                        assert a is None


# ---- cross_entropy ----

def _ce_case(ce, rows, classes, dtype, probabilities=False, weighted=False, smoothing=0.0, reduction=1,
             ignore_index=-100, ignore_some=False, uint8=False):
    x = torch.randn(rows, classes, dtype=dtype) * 3
    if probabilities:
        t = torch.softmax(torch.randn(rows, classes), 1).to(dtype)
    else:
        t = torch.randint(0, classes, (rows,))
        if ignore_some and rows:
            t[::3] = ignore_index
        if uint8:
            t = t.to(torch.uint8)
    w = torch.rand(classes, dtype=dtype) + 0.5 if weighted else None
    what = (f"rows={rows} C={classes} {dtype} probabilities={probabilities} weight={weighted} "
            f"smoothing={smoothing} reduction={reduction} ignore={ignore_some}")
    got = ce.cross_entropy_forward(x, t, w, reduction, ignore_index, smoothing)
    want = OPS.cross_entropy_forward(x, t, w, reduction, ignore_index, smoothing)
    assert ce.asserts() == 0, what
    assert_close(got[0], want[0], dtype, "loss " + what)
    assert_close(got[1], want[1], dtype, "logsumexp " + what)
    g = torch.randn_like(want[0])
    if reduction == 0 and rows > 1:
        g = torch.randn((), dtype=dtype).expand(rows)  # stride 0, as from loss.sum().backward()
    masks = ([True, True], [False, True]) if probabilities else ([True, False],)
    for mask in masks:
        got = ce._cross_entropy_backward(g, x, t, w, want[1], reduction, ignore_index, smoothing, mask)
        expected = OPS._cross_entropy_backward(g.contiguous(), x, t, w, want[1], reduction, ignore_index, smoothing,
                                              mask)
        for a, b in zip(got, expected):
            if b is None:
                assert a is None
            else:
                assert_close(a, b, dtype, f"grad {mask} " + what)
    assert ce.asserts() == 0, what


# Warp groups of 1, 2, 8, 32 lanes and a block per row; single-block and multi-block grids.
CE_SHAPES = [(64, 10), (1, 1), (5, 2), (3, 3), (40, 33), (200, 10), (0, 10), (9, 64), (3, 1025), (2, 3000),
             (4, 0)]
CE_OPTIONS = [(False, False, 0.0), (False, True, 0.1), (True, False, 0.0), (True, True, 0.2), (False, False, 0.3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_emulated(ce, dtype):
    for rows, classes in CE_SHAPES:
        for reduction in (0, 1, 2):
            for probabilities, weighted, smoothing in CE_OPTIONS:
                if classes == 0 and not probabilities:
                    continue
                _ce_case(ce, rows, classes, dtype, probabilities, weighted, smoothing, reduction,
                         ignore_some=not probabilities)


def test_cross_entropy_emulated_more_options(ce):
    _ce_case(ce, 50, 10, torch.float32, ignore_index=3, ignore_some=True)
    _ce_case(ce, 50, 10, torch.float32, uint8=True)
    _ce_case(ce, 2000, 10, torch.float32, weighted=True, smoothing=0.1, ignore_some=True)  # partials + finish
    _ce_case(ce, 1500, 1, torch.float32, reduction=1)  # one lane per row, several blocks


def test_cross_entropy_emulated_bad_index_asserts(ce):
    x = torch.randn(8, 10)
    t = torch.zeros(8, dtype=torch.long)
    t[3] = 10
    ce.cross_entropy_forward(x, t, None, 1, -100, 0.0)
    assert ce.asserts() > 0
    t[3] = -5
    stats = OPS.cross_entropy_forward(x, torch.zeros(8, dtype=torch.long), None, 1, -100, 0.0)[1]  # (8, 2)
    ce._cross_entropy_backward(torch.ones(()), x, t, None, stats, 1, -100, 0.0, [True, False])
    assert ce.asserts() > 0
    x = torch.randn(2, 2000)  # a block per row
    ce.cross_entropy_forward(x, torch.tensor([0, 1 << 40]), None, 0, -100, 0.0)
    assert ce.asserts() > 0


# ---- train_step_sgd ----

def _step_case(emu, sizes, rows, dtype, sgd, steps=2, ignore_some=False, ignore_all=False, smoothing=0.0):
    """Steps of the emulated CUDA kernel and of the CPU kernel from the same state: the same loss,
    correct count, parameters, momentum buffers and workspace (activations and grads)."""
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        params += [torch.randn(b, a, dtype=dtype) * a ** -0.5, torch.randn(b, dtype=dtype) * 0.1]
    x = torch.randn(rows, sizes[0], dtype=dtype)
    t = torch.randint(0, sizes[-1], (rows,))
    if ignore_some:
        t[::3] = -100
    if ignore_all:
        t[:] = -100
    lr_, momentum, dampening, weight_decay, nesterov = sgd
    states = {}
    for backend, op in (("emu", emu.train_step_sgd), ("cpu", OPS.train_step_sgd)):
        p = [q.clone() for q in params]
        buffers = [torch.zeros_like(q) for q in p] if momentum else []
        ws = OPS.train_step_workspace(x, p)
        results = []
        for step in range(steps):
            loss, correct = op(x, t, p, buffers, ws, lr_, momentum, dampening, weight_decay, nesterov, step == 0,
                               -100, smoothing)
            results.append((loss.clone(), int(correct)))
        states[backend] = results, p, buffers, [w.clone() for w in ws]
    what = f"sizes={sizes} rows={rows} {dtype} sgd={sgd} ignore={ignore_some or ignore_all} smoothing={smoothing}"
    assert emu.asserts() == 0, what
    (got, p_got, b_got, ws_got), (want, p_want, b_want, ws_want) = states["emu"], states["cpu"]
    for (loss_got, correct_got), (loss_want, correct_want) in zip(got, want):
        assert_close(loss_got, loss_want, dtype, "loss " + what)
        assert correct_got == correct_want, what
    for name, a_list, b_list in (("param", p_got, p_want), ("buffer", b_got, b_want), ("workspace", ws_got, ws_want)):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert_close(a, b, dtype, f"{name} {i} " + what)


SGD_OPTIONS = [(0.1, 0.0, 0.0, 0.0, False), (0.1, 0.9, 0.0, 1e-2, False), (0.05, 0.9, 0.0, 0.0, True),
               (0.05, 0.8, 0.3, 1e-3, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_train_step_emulated(emu, dtype):
    for sizes in [(20, 16, 8, 5), (12, 3), (7, 9, 10)]:
        for sgd in SGD_OPTIONS:
            _step_case(emu, sizes, 64, dtype, sgd)
    for rows in (1, 0, 600):  # one row, none (a NaN mean, zero grads), several blocks (partials + finish)
        _step_case(emu, (20, 16, 8, 5), rows, dtype, SGD_OPTIONS[1])
    _step_case(emu, (20, 16, 5), 50, dtype, SGD_OPTIONS[1], ignore_some=True, smoothing=0.1)
    _step_case(emu, (20, 16, 5), 10, dtype, SGD_OPTIONS[0], ignore_all=True)


def test_train_step_emulated_bad_index_raises_before_writing(emu):
    p = [torch.randn(4, 6), torch.randn(4), torch.randn(3, 4), torch.randn(3)]
    before = [q.clone() for q in p]
    x = torch.randn(5, 6)
    ws = OPS.train_step_workspace(x, p)
    for bad in (3, -1):
        t = torch.tensor([0, 1, bad, 2, 0])
        with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds for 3 classes \(row 2\)"):
            emu.train_step_sgd(x, t, p, [], ws, 0.1, 0.0, 0.0, 0.0, False, True, -100, 0.0)
        for a, b in zip(p, before):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_train_step_grads_emulated(emu, dtype):
    # The same passes without the update: the same loss, correct count and gradients; no parameter moves.
    params = [torch.randn(16, 20, dtype=dtype) * 0.2, torch.randn(16, dtype=dtype) * 0.1,
              torch.randn(5, 16, dtype=dtype) * 0.25, torch.randn(5, dtype=dtype) * 0.1]
    x, t = torch.randn(50, 20, dtype=dtype), torch.randint(0, 5, (50,))
    t[::4] = -100
    before = [p.clone() for p in params]
    results = []
    for op in (emu.train_step_grads, OPS.train_step_grads):
        ws = OPS.train_step_workspace(x, params)
        loss, correct = op(x, t, params, ws, -100, 0.1)
        results.append((loss, int(correct), ws))
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert emu.asserts() == 0
    (loss_got, correct_got, ws_got), (loss_want, correct_want, ws_want) = results
    assert_close(loss_got, loss_want, dtype, "loss")
    assert correct_got == correct_want
    for i, (a, b) in enumerate(zip(ws_got, ws_want)):
        assert_close(a, b, dtype, f"workspace {i}")
