"""Second-order gradients for gradient-ℓ1's double backprop.

The exact gradient-ℓ1 step differentiates a backward pass. TensorFlow builds the backward of a
backward op from the gradient functions registered for the first-order gradient ops; two of
them need a different rule here.

TFMOT's fake-quant ops
----------------------
TensorFlow's gradient of ``FakeQuantWithMinMaxVars[PerChannel]`` is the op
``FakeQuantWithMinMaxVars[PerChannel]Gradient``, which TF registers as NOT differentiable, so a
double backprop through a TFMOT model silently returns no gradient.
:func:`register_fake_quant_second_order` re-registers the first-order gradient with the same
values (``dx = dy·[min ≤ x ≤ max]``, ``dmin/dmax = Σ dy`` below/above the nudged range) written as
a product with a constant mask, which is differentiable in ``dy``.

Max pooling and ReLU (:func:`fast_second_order`)
-------------------------------------------------
A ReLU read only by a max pool (conv → ReLU → pool): the gradient reaching the ReLU's output
``a`` is ``MaxPoolGrad(a, p, dp)``, non-zero only at each window's chosen element, where
``a = p`` (the window's maximum). The ReLU's mask ``[a > 0]`` there equals ``[p > 0]``, so

    ReluGrad(MaxPoolGrad(a, p, dp), a) = MaxPoolGrad(a, p, ReluGrad(dp, p))

bit for bit, for every window shape, stride and padding (ties too: the pool picks one element,
which holds ``p``). The ReLU's mask then runs on the pool's output, a quarter of the values for
2×2 windows; so does the mask's own derivative in the double backprop. When the ReLU's output
has another reader (its gradient is then a sum), TF's rule is used.

The first-order gradient of a max pool routes ``dy`` to each window's maximum,
``dx = MaxPoolGrad(x, y, dy) = Mᵀ·dy`` with ``M`` the 0/1 selection of the chosen elements. Its
derivative in ``dy`` applied to ``g`` is ``M·g``, each window's ``g`` at the chosen element: TF
computes it with ``MaxPoolGradGrad``, a CPU kernel that searches every window again, and on the
benchmark CNN it took more time than the two forward convolutions. For non-overlapping windows
(``ksize == strides``, VALID, or SAME on sizes the window divides) the same values are

    M·g = Σ_window (Mᵀ·1) ⊙ g,    Mᵀ·1 = MaxPoolGrad(x, y, ones)

one more first-order max-pool gradient (the same kernel as the forward pass's, so it picks the
same element among ties), an elementwise product and a window sum (an average pool times the
window size when that is a power of two, so exact; otherwise ``max + min`` over the window,
exact too since one element per window is non-zero). Overlapping windows keep TF's rule. Both
``MaxPoolGrad`` and ``ReluGrad`` have derivatives zero (almost everywhere) in the forward
tensors they read; TF returns materialized zero tensors for them, which the backward pass then
adds, and these rules return ``None`` (no gradient) instead.

The max-pool and ReLU rules are on only inside :func:`fast_second_order` (a TrainingModel's
gradient-ℓ1 step enters it around each of its gradients: the inner and outer ones of the exact
form, both passes of the finite difference; it is thread-local, so replica threads of a
``tf.distribute`` strategy each enter their own): outside it, every gradient is TF's own, so
a plain step (no gradient-ℓ1) runs TF's rules.
"""

from __future__ import annotations

import contextlib
import threading

from tfqreg._keras import tf

__all__ = ["fast_second_order", "register_fake_quant_second_order"]


def _registry():
    from tensorflow.python.framework import ops as tf_ops  # the registry is not public API

    return tf_ops, tf_ops._gradient_registry  # pylint: disable=protected-access


def _replace_gradient(op_name: str, fn) -> None:
    tf_ops, registry = _registry()
    registry._registry.pop(op_name, None)  # pylint: disable=protected-access
    tf_ops.RegisterGradient(op_name)(fn)


# ---------------------------------------------------------------------------------------------
# TFMOT fake-quant: a first-order gradient built from differentiable ops
# ---------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_FQ_DONE = False


def _fake_quant_gradient(op, grad, per_channel: bool):
    x, lo, hi = op.inputs
    mask_fn = (tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient if per_channel
               else tf.quantization.fake_quant_with_min_max_vars_gradient)
    inside = tf.stop_gradient(mask_fn(
        tf.ones_like(x), x, lo, hi, num_bits=op.get_attr("num_bits"),
        narrow_range=op.get_attr("narrow_range"))[0])
    outside = 1.0 - inside
    below = outside * tf.cast(x < (lo + hi) / 2.0, x.dtype)
    above = outside - below
    axes = list(range(x.shape.rank - 1)) if per_channel else None
    return (grad * inside, tf.reduce_sum(grad * below, axis=axes),
            tf.reduce_sum(grad * above, axis=axes))


def _fq_grad_tensor(op, grad):
    return _fake_quant_gradient(op, grad, per_channel=False)


def _fq_grad_channel(op, grad):
    return _fake_quant_gradient(op, grad, per_channel=True)


def register_fake_quant_second_order() -> None:
    """Make the gradient of TF's FakeQuantWithMinMaxVars[PerChannel] (TFMOT's quantizers)
    twice differentiable, with unchanged first-order values. Done once per process; called when
    a :class:`GradientL1` attaches to a model that contains TFMOT layers."""
    global _FQ_DONE
    with _LOCK:
        if _FQ_DONE:
            return
        _replace_gradient("FakeQuantWithMinMaxVars", _fq_grad_tensor)
        _replace_gradient("FakeQuantWithMinMaxVarsPerChannel", _fq_grad_channel)
        _FQ_DONE = True


# ---------------------------------------------------------------------------------------------
# Max pooling and ReLU: cheaper second-order rules with the same values, inside a scope
# ---------------------------------------------------------------------------------------------

_SCOPE = threading.local()
_TF_RULES: dict = {}  # op name -> TF's registered gradient function (set when installed)


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _window_sum(t, kh: int, kw: int):
    """The sum over each non-overlapping ``kh × kw`` window of ``t`` (NHWC, sizes divisible),
    exact when at most one element of each window is non-zero."""
    size = kh * kw
    if size & (size - 1) == 0:  # a power of two: the mean times the size is exact
        return tf.nn.avg_pool2d(t, [kh, kw], [kh, kw], "VALID") * tf.cast(size, t.dtype)
    return (tf.nn.max_pool2d(t, [kh, kw], [kh, kw], "VALID")
            - tf.nn.max_pool2d(-t, [kh, kw], [kh, kw], "VALID"))


def _max_pool_grad_grad(op, grad):
    """Gradient of ``MaxPoolGrad(x, y, dy)``: ``M·grad`` for ``dy`` (module docstring)."""
    ksize, strides = list(op.get_attr("ksize")), list(op.get_attr("strides"))
    padding, data_format = _as_str(op.get_attr("padding")), _as_str(op.get_attr("data_format"))
    x, y = op.inputs[0], op.inputs[1]
    shape = x.shape
    kh, kw = ksize[1], ksize[2]
    plain = (data_format == "NHWC" and ksize == strides and ksize[0] == 1 and ksize[3] == 1
             and shape.rank == 4 and shape[1] is not None and shape[2] is not None
             and grad.dtype in (tf.float16, tf.bfloat16, tf.float32, tf.float64))
    if plain and padding == "SAME":
        plain = shape[1] % kh == 0 and shape[2] % kw == 0  # then SAME pads nothing
    elif padding != "VALID":
        plain = False
    if not plain:  # TF's MaxPoolGradGrad, without its zero tensors for x and y
        return None, None, _TF_RULES["MaxPoolGrad"](op, grad)[2]
    chosen = tf.stop_gradient(tf.raw_ops.MaxPoolGrad(
        orig_input=x, orig_output=y, grad=tf.ones_like(y), ksize=ksize, strides=strides,
        padding=padding, data_format=data_format))
    picked = chosen * grad
    ho, wo = shape[1] // kh, shape[2] // kw
    if (ho * kh, wo * kw) != (shape[1], shape[2]):  # VALID drops the last rows / columns
        picked = picked[:, :ho * kh, :wo * kw, :]
    return None, None, _window_sum(picked, kh, kw)


def _relu_grad(op, grad):
    """Gradient of ``h = Relu(z)`` when ``grad`` is ``MaxPoolGrad(h, p, dp)``: the ReLU's mask
    applied at the pool's output, ``MaxPoolGrad(h, p, ReluGrad(dp, p))`` (module docstring)."""
    src = getattr(grad, "op", None)
    h = op.outputs[0]
    if (src is None or src.type != "MaxPoolGrad" or src.graph is not h.graph
            or src.inputs[0].name != h.name):
        return _TF_RULES["Relu"](op, grad)
    pooled, dp = src.inputs[1], src.inputs[2]
    return tf.raw_ops.MaxPoolGrad(
        orig_input=h, orig_output=pooled, grad=tf.raw_ops.ReluGrad(gradients=dp, features=pooled),
        ksize=src.get_attr("ksize"), strides=src.get_attr("strides"),
        padding=src.get_attr("padding"), explicit_paddings=src.get_attr("explicit_paddings"),
        data_format=src.get_attr("data_format"))


def _relu_grad_grad(op, grad):
    """Gradient of ``ReluGrad(dy, x)``: ``ReluGrad(grad, x)`` for ``dy``, none for ``x``."""
    return tf.raw_ops.ReluGrad(gradients=grad, features=op.inputs[1]), None


_RULES = {"MaxPoolGrad": _max_pool_grad_grad, "ReluGrad": _relu_grad_grad, "Relu": _relu_grad}


def _scoped(name: str, fn):
    """The gradient function registered for ``name``: ``fn`` inside :func:`fast_second_order`
    (this thread), TF's own rule outside it."""
    tf_rule = _TF_RULES[name]

    def gradient(op, grad):
        if getattr(_SCOPE, "depth", 0) > 0:
            return fn(op, grad)
        return tf_rule(op, grad)

    return gradient


def _install_rules() -> None:
    with _LOCK:
        if _TF_RULES:
            return
        _, registry = _registry()
        for name, fn in _RULES.items():
            _TF_RULES[name] = registry.lookup(name)
            _replace_gradient(name, _scoped(name, fn))


@contextlib.contextmanager
def fast_second_order():
    """Within this block (this thread), differentiate ``Relu`` before a max pool, and
    ``MaxPoolGrad`` and ``ReluGrad``, with the cheaper rules of the module docstring: same
    values as TF's, smaller or fewer kernels.

    >>> import tensorflow as tf
    >>> x = tf.random.stateless_normal([2, 4, 4, 1], seed=[1, 2])
    >>> def double_backprop():
    ...     with tf.GradientTape() as outer:
    ...         outer.watch(x)
    ...         with tf.GradientTape() as inner:
    ...             inner.watch(x)
    ...             y = tf.reduce_sum(tf.nn.max_pool2d(x, 2, 2, "VALID") ** 2)
    ...         g = inner.gradient(y, x)
    ...         norm = tf.reduce_sum(tf.abs(g))
    ...     return outer.gradient(norm, x)
    >>> with fast_second_order():
    ...     fast = double_backprop()
    >>> bool(tf.reduce_all(fast == double_backprop()))
    True
    """
    _install_rules()
    depth = getattr(_SCOPE, "depth", 0)
    _SCOPE.depth = depth + 1
    try:
        yield
    finally:
        _SCOPE.depth = depth
