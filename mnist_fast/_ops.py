"""The Python side of every mnist_fast op: fake kernels, and the eager fast path.

Fakes (torch.library.register_fake) give shapes and dtypes, so torch.compile can trace the ops and
torch.library.opcheck can test them. They are also the ops' Meta kernels, and the dispatcher picks
Meta over CPU when a call mixes the two (a CPU input with a meta target): so each fake runs the
argument checks of csrc/checks.h first (same error types, same wording), and a mixed-device call
raises as the CPU kernel would instead of returning uninitialized memory.

Autograd is registered in C++ (csrc/autograd.cpp), not here: the Python wiring would cost more per
call than the op.
"""
import torch

from . import _C

__all__ = ["fast_path"]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_REDUCTIONS = (0, 1, 2)  # none, mean, sum
_ROW_STATS = 2  # float64 values a row the cross-entropy forward saves (row_math.h's kRowStats)


def fast_path(name: str):
    """The op `name` as a Python function: in eager mode the pybind11 entry point mnist_fast._C.<name>
    (a direct call into the same dispatcher op, about 2 us less per call than torch.ops), while
    torch.compile traces it as torch.ops.mnist_fast.<name> so the compiler sees the registered op."""
    fast, op, compiling = getattr(_C, name), getattr(torch.ops.mnist_fast, name).default, torch.compiler.is_compiling

    def call(*args):
        return op(*args) if compiling() else fast(*args)

    call.__name__ = call.__qualname__ = name
    return call


# ---- the checks of csrc/checks.h ----

def _shape(t) -> list:
    return list(t.shape)


def _check_float(t, op, name):
    torch._check_type(t.dtype in _FLOATS,
                      lambda: f"{op}: expected {name} to be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_same_kind(ref, ref_name, t, name, op):
    torch._check(t.device == ref.device,
                 lambda: f"{op}: expected {name} on the same device as {ref_name} ({ref.device}), got {t.device}")
    torch._check_type(t.dtype == ref.dtype,
                      lambda: f"{op}: expected {name} to have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def _check_linear_relu(input, weight, bias):
    op = "mnist_fast.linear_relu"
    _check_float(input, op, "input")
    _check_same_kind(input, "input", weight, "weight", op)
    torch._check_value(input.dim() >= 1, lambda: f"{op}: expected input of shape (*, in_features), got a 0-d tensor")
    torch._check_value(weight.dim() == 2,
                       lambda: f"{op}: expected weight of shape (out_features, in_features), got shape {_shape(weight)}")
    torch._check_value(input.shape[-1] == weight.shape[1],
                       lambda: f"{op}: input has {input.shape[-1]} features in its last dimension but weight expects "
                               f"in_features = {weight.shape[1]}")
    if bias is not None:
        _check_same_kind(input, "input", bias, "bias", op)
        torch._check_value(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                           lambda: f"{op}: expected bias of shape ({weight.shape[0]},), got shape {_shape(bias)}")


def _check_cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing):
    op = "mnist_fast.cross_entropy"
    _check_float(input, op, "input")
    torch._check_value(input.dim() == 2, lambda: f"{op}: expected input of shape (N, C), got shape {_shape(input)}")
    torch._check(target.device == input.device,
                 lambda: f"{op}: expected target on the same device as input ({input.device}), got {target.device}")
    torch._check_value(reduction in _REDUCTIONS,
                       lambda: f"{op}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    torch._check_value(0.0 <= label_smoothing <= 1.0,
                       lambda: f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if weight is not None:
        _check_same_kind(input, "input", weight, "weight", op)
        torch._check_value(weight.dim() == 1 and weight.shape[0] == input.shape[1],
                           lambda: f"{op}: expected a weight for each of the {input.shape[1]} classes, got weight "
                                   f"of shape {_shape(weight)}")
    if target.dim() == 2:
        torch._check_value(_shape(target) == _shape(input),
                           lambda: f"{op}: probability targets must have the shape of input {_shape(input)}, "
                                   f"got {_shape(target)}")
        torch._check_type(target.dtype == input.dtype,
                          lambda: f"{op}: expected probability targets with the dtype of input ({input.dtype}), "
                                  f"got {target.dtype}")
        torch._check_value(ignore_index < 0, lambda: f"{op}: ignore_index is not supported for probability targets")
        return
    torch._check_value(target.dim() == 1, lambda: f"{op}: expected target of shape (N,) with class indices or "
                                                  f"(N, C) with class probabilities, got shape {_shape(target)}")
    torch._check_type(target.dtype in (torch.int64, torch.uint8),
                      lambda: f"{op}: expected class-index targets of dtype int64 (or uint8), got {target.dtype}")
    torch._check_value(target.shape[0] == input.shape[0],
                       lambda: f"{op}: expected input batch_size ({input.shape[0]}) to match target batch_size "
                               f"({target.shape[0]})")


def _workspace_shapes(rows, params) -> list:
    """csrc/checks.h's train_step_workspace_shapes: each layer's output, each hidden layer's grad, each
    parameter's grad."""
    outs = [[rows, w.shape[0]] for w in params[::2]]
    return outs + outs[:-1] + [_shape(p) for p in params]


def _check_train_step(input, target, params, momentum_buffers, workspace, lr, momentum, dampening, weight_decay,
                      nesterov, label_smoothing):
    op = "mnist_fast.train_step_sgd"
    torch._check_type(input.dtype in (torch.float32, torch.float64),
                      lambda: f"{op}: expected float32 or float64 input, got {input.dtype}")
    torch._check_value(input.dim() == 2, lambda: f"{op}: expected input of shape (N, in_features), got shape "
                                                 f"{_shape(input)}")
    torch._check_value(len(params) >= 2 and len(params) % 2 == 0,
                       lambda: f"{op}: expected params [weight_0, bias_0, ..., weight_L-1, bias_L-1] (an even, "
                               f"non-zero count), got {len(params)} tensors")
    features = input.shape[1]
    for layer, (w, b) in enumerate(zip(params[::2], params[1::2])):
        _check_same_kind(input, "input", w, "every weight", op)
        _check_same_kind(input, "input", b, "every bias", op)
        torch._check_value(w.dim() == 2 and w.shape[1] == features,
                           lambda: f"{op}: layer {layer} expects {features} input features, got weight of shape "
                                   f"{_shape(w)}")
        torch._check_value(b.dim() == 1 and b.shape[0] == w.shape[0],
                           lambda: f"{op}: expected bias {layer} of shape ({w.shape[0]},), got shape {_shape(b)}")
        features = w.shape[0]
    torch._check(target.device == input.device,
                 lambda: f"{op}: expected target on the same device as input ({input.device}), got {target.device}")
    torch._check_type(target.dtype == torch.int64,
                      lambda: f"{op}: expected class-index targets of dtype int64, got {target.dtype}")
    torch._check_value(target.dim() == 1 and target.shape[0] == input.shape[0],
                       lambda: f"{op}: expected target of shape ({input.shape[0]},), got shape {_shape(target)}")
    # The same messages as torch.optim.SGD.
    torch._check_value(lr >= 0.0, lambda: f"{op}: Invalid learning rate: {lr}")
    torch._check_value(momentum >= 0.0, lambda: f"{op}: Invalid momentum value: {momentum}")
    torch._check_value(weight_decay >= 0.0, lambda: f"{op}: Invalid weight_decay value: {weight_decay}")
    torch._check_value(not nesterov or (momentum > 0.0 and dampening == 0.0),
                       lambda: f"{op}: Nesterov momentum requires a momentum and zero dampening")
    torch._check_value(0.0 <= label_smoothing <= 1.0,
                       lambda: f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    torch._check_value(len(momentum_buffers) == (len(params) if momentum else 0),
                       lambda: f"{op}: expected {len(params) if momentum else 0} momentum buffers, got "
                               f"{len(momentum_buffers)}")
    for p, buf in zip(params, momentum_buffers):
        _check_same_kind(p, "its parameter", buf, "every momentum buffer", op)
        torch._check_value(_shape(buf) == _shape(p), lambda: f"{op}: expected a momentum buffer of shape {_shape(p)}, "
                                                             f"got {_shape(buf)}")
    shapes = _workspace_shapes(input.shape[0], params)
    torch._check_value(len(workspace) == len(shapes),
                       lambda: f"{op}: expected a workspace of {len(shapes)} tensors, got {len(workspace)}")
    for t, shape in zip(workspace, shapes):
        _check_same_kind(input, "input", t, "every workspace tensor", op)
        torch._check_value(_shape(t) == shape, lambda: f"{op}: expected a workspace tensor of shape {shape}, got "
                                                       f"{_shape(t)} (allocate it with train_step_workspace)")


# ---- fakes ----

@torch.library.register_fake("mnist_fast::linear_relu")
def _linear_relu_fake(input, weight, bias):
    _check_linear_relu(input, weight, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("mnist_fast::_linear_relu_backward")
def _linear_relu_backward_fake(grad_output, input, weight, output, output_mask):
    op = "mnist_fast.linear_relu_backward"
    _check_linear_relu(input, weight, None)
    _check_same_kind(input, "input", grad_output, "grad_output", op)
    _check_same_kind(input, "input", output, "output", op)
    expected = [*input.shape[:-1], weight.shape[0]]
    torch._check_value(_shape(output) == expected and _shape(grad_output) == expected,
                       lambda: f"{op}: expected output and grad_output of shape {expected}, got {_shape(output)} "
                               f"and {_shape(grad_output)}")
    grad_input = torch.empty_like(input) if output_mask[0] else None
    grad_weight = torch.empty_like(weight) if output_mask[1] else None
    grad_bias = weight.new_empty((weight.shape[0],)) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("mnist_fast::cross_entropy_forward")
def _cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    _check_cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing)
    rows = input.shape[0]
    loss = input.new_empty((rows,) if reduction == 0 else ())
    # Per row the max and log(sum(exp(x - max))), float64 for every input dtype (row_math.h).
    lse = input.new_empty((rows, _ROW_STATS), dtype=torch.float64)
    return loss, lse


@torch.library.register_fake("mnist_fast::_cross_entropy_forward_backward")
def _cross_entropy_forward_backward_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    loss, lse = _cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing)
    return loss, lse, torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("mnist_fast::_cross_entropy_backward")
def _cross_entropy_backward_fake(
    grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing, output_mask
):
    op = "mnist_fast.cross_entropy_backward"
    _check_cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing)
    _check_same_kind(input, "input", grad_loss, "grad_loss", op)
    expected = [input.shape[0]] if reduction == 0 else []
    torch._check_value(_shape(grad_loss) == expected,
                       lambda: f"{op}: expected grad_loss of shape {expected}, got {_shape(grad_loss)}")
    torch._check(logsumexp.device == input.device, lambda: f"{op}: expected logsumexp on the same device as input")
    torch._check_type(logsumexp.dtype == torch.float64,
                      lambda: f"{op}: expected logsumexp of dtype torch.float64, got {logsumexp.dtype}")
    torch._check_value(_shape(logsumexp) == [input.shape[0], _ROW_STATS],
                       lambda: f"{op}: expected logsumexp of shape ({input.shape[0]}, {_ROW_STATS}), got "
                               f"{_shape(logsumexp)}")
    grad_input = torch.empty_like(input) if output_mask[0] else None
    grad_target = torch.empty_like(input) if output_mask[1] else None
    return grad_input, grad_target


# train_step_sgd mutates params, momentum_buffers and workspace in place (its schema says so) and
# returns a 0-d loss of the input's dtype and a 0-d int64 count of correct predictions.
# train_step_workspace is a composite op (it only allocates) and needs no fake.
@torch.library.register_fake("mnist_fast::train_step_sgd")
def _train_step_sgd_fake(input, target, params, momentum_buffers, workspace, lr, momentum, dampening,
                         weight_decay, nesterov, first_step, ignore_index, label_smoothing):
    _check_train_step(input, target, params, momentum_buffers, workspace, lr, momentum, dampening, weight_decay,
                      nesterov, label_smoothing)
    return input.new_empty(()), input.new_empty((), dtype=torch.int64)


# train_step_grads: train_step_sgd without the update; it writes the workspace alone.
@torch.library.register_fake("mnist_fast::train_step_grads")
def _train_step_grads_fake(input, target, params, workspace, ignore_index, label_smoothing):
    _check_train_step(input, target, params, [], workspace, 0.0, 0.0, 0.0, 0.0, False, label_smoothing)
    return input.new_empty(()), input.new_empty((), dtype=torch.int64)


# ---- fused_mlp (a whole MLP as one op) ----

def _check_mlp_chain(input, weights, biases):
    torch._check(input.dim() >= 1, lambda: "fused_mlp: input needs at least 1 dimension")
    torch._check(len(weights) >= 1 and len(biases) == len(weights), lambda: "fused_mlp: one bias entry per weight")
    # A meta tensor among CPU ones dispatches here, not to the kernel that checks devices.
    for t in [*weights, *[b for b in biases if b is not None]]:
        torch._check(t.device == input.device, lambda: f"mnist_fast.fused_mlp: expected every weight and bias on "
                     f"the same device as input ({input.device}), got {t.device}")
    features = input.shape[-1]
    for w in weights:
        torch._check(w.dim() == 2, lambda: "fused_mlp: every weight must be 2-d")
        torch._check(w.shape[1] == features, lambda: "fused_mlp: the layers do not chain")
        features = w.shape[0]


@torch.library.register_fake("mnist_fast::fused_mlp_forward")
def _fused_mlp_forward_fake(input, weights, biases, log_softmax=False):
    _check_mlp_chain(input, weights, biases)
    rows = 1
    for size in input.shape[:-1]:
        rows = rows * size
    hidden = [input.new_empty((rows, w.shape[0])) for w in weights[:-1]]
    return input.new_empty((*input.shape[:-1], weights[-1].shape[0])), hidden


@torch.library.register_fake("mnist_fast::_fused_mlp_backward")
def _fused_mlp_backward_fake(grad_output, input, weights, hidden, output, output_mask):
    # Every gradient the kernel returns is a fresh contiguous tensor.
    grad_input = input.new_empty(input.shape) if output_mask[0] else None
    grad_weights = [w.new_empty(w.shape) if output_mask[1 + 2 * l] else None for l, w in enumerate(weights)]
    grad_biases = [w.new_empty((w.shape[0],)) if output_mask[2 + 2 * l] else None for l, w in enumerate(weights)]
    return grad_input, grad_weights, grad_biases


# ---- whole-epoch training (csrc/train_epoch.cpp) ----
# train_epoch_sgd (train_epoch_adam) mutates params and momentum_buffers (exp_avgs, exp_avg_sqs) in
# place and returns one loss (the input's dtype: pixel_values' for uint8 images) and one correct
# count (int64) per step: ceil(len(order) / batch_size) steps.

def _epoch_fake(op, images, order, batch_size, params, pixel_values):
    torch._check(batch_size >= 1, lambda: f"{op}: batch_size must be positive")
    torch._check(order.dim() == 1, lambda: f"{op}: order must be 1-D")
    torch._check(len(params) >= 2 and len(params) % 2 == 0, lambda: f"{op}: params must be weight/bias pairs")
    steps = (order.shape[0] + batch_size - 1) // batch_size
    losses = (pixel_values if pixel_values is not None else images).new_empty((steps,))
    return losses, images.new_empty((steps,), dtype=torch.int64)


@torch.library.register_fake("mnist_fast::train_epoch_sgd")
def _train_epoch_sgd_fake(images, labels, order, batch_size, lr, params, momentum_buffers, momentum, dampening,
                          weight_decay, nesterov, first_step, ignore_index, label_smoothing, pixel_values=None):
    return _epoch_fake("train_epoch_sgd", images, order, batch_size, params, pixel_values)


@torch.library.register_fake("mnist_fast::train_epoch_adam")
def _train_epoch_adam_fake(images, labels, order, batch_size, lr, params, exp_avgs, exp_avg_sqs, step, beta1, beta2,
                           eps, weight_decay, decoupled_weight_decay, ignore_index, label_smoothing,
                           pixel_values=None):
    return _epoch_fake("train_epoch_adam", images, order, batch_size, params, pixel_values)


# ---- Adam / AdamW update (csrc/cpu/adam.cpp) ----
# adam_update mutates params, exp_avgs and exp_avg_sqs in place and returns nothing.

@torch.library.register_fake("mnist_fast::adam_update")
def _adam_update_fake(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                      decoupled_weight_decay):
    torch._check(len(grads) == len(params) and len(exp_avgs) == len(params) and len(exp_avg_sqs) == len(params),
                 lambda: "adam_update: expected one gradient, exp_avg and exp_avg_sq per parameter")
    return None
