"""Running ``.tflite`` flatbuffers: LiteRT, Larq Compute Engine, TFLite Micro; float in,
float out.

:class:`Runner` wraps the three interpreters behind one ``predict``; :func:`quantize` and
:func:`dequantize` are the affine maps it applies at a quantized model's boundary. Imports
only :mod:`tfqreg.deploy.tflite_file` (to read the input/output tensors); the interpreters
themselves are imported when a runner is made.

>>> from tfqreg.deploy import Runner
>>> y = Runner("tflite_models/fmnist_cnn_int8.tflite").predict(x)     # doctest: +SKIP
>>> y_micro = Runner(flat, "micro", arena_size=8192).predict(x[:10])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import numpy as np

from tfqreg.deploy.tflite_file import TensorInfo, as_flatbuffer, read_tflite

__all__ = ["BACKENDS", "KERNELS", "quantize", "dequantize", "Runner"]

BACKENDS = ("litert", "lce", "micro")
KERNELS = ("auto", "builtin", "reference")


def quantize(x: np.ndarray, dtype: Any, scale: float, zero_point: int) -> np.ndarray:
    """``x`` as ``dtype``: float dtypes are a cast; integer ones ``round(x / scale + zp)``,
    clipped to the dtype's range.

    Raises:
        ValueError: an integer ``dtype`` without a scale.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return x.astype(dtype)
    if not scale:
        raise ValueError(f"an {dtype} input tensor without quantization parameters")
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32 (a float array, or no scale: a cast)."""
    if np.dtype(q.dtype).kind == "f" or not scale:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _qparams(t: TensorInfo) -> Tuple[float, int]:
    return (t.scale[0] if t.scale else 0.0), (t.zero_point[0] if t.zero_point else 0)


class Runner:
    """Run a ``.tflite`` flatbuffer on NumPy batches in one of three interpreters.

    Inputs are float arrays (quantized here with the input tensor's scale and zero point when the
    model takes int8/uint8); outputs come back dequantized to float32 (``raw=True`` gives the
    integers). Models with a static batch size ``B`` are run ``B`` samples at a time (the last
    chunk padded); a dynamic batch is resized.

    Args:
        flatbuffer: ``.tflite`` bytes, a path or an object carrying ``.flatbuffer`` (an
            ``ExportResult``).
        backend: ``"litert"`` (``ai_edge_litert``), ``"lce"`` (Larq Compute Engine's
            interpreter, needed for ``Lce*`` ops) or ``"micro"`` (TFLite Micro's Python
            interpreter; batch 1 models).
        arena_size: TFLite Micro arena in bytes (``None``: its 10x-model-size default).
        kernels: LiteRT kernels: ``"auto"`` (default: builtin kernels + the XNNPACK delegate,
            what apps get), ``"builtin"`` (builtin optimized kernels, no delegate; agrees
            exactly with TFLite Micro on int8 models) or ``"reference"``.

    Raises:
        ValueError: an unknown ``backend`` / ``kernels``, or bytes that are not a (valid)
            TFLite flatbuffer.
    """

    BACKENDS = BACKENDS
    KERNELS = KERNELS

    def __init__(self, flatbuffer: Any, backend: str = "litert",
                 arena_size: Optional[int] = None, kernels: str = "auto"):
        if backend not in self.BACKENDS:
            raise ValueError(f"`backend` must be one of {self.BACKENDS}, got {backend!r}.")
        if kernels not in self.KERNELS:
            raise ValueError(f"`kernels` must be one of {self.KERNELS}, got {kernels!r}.")
        self.kernels = kernels
        self.flatbuffer = as_flatbuffer(flatbuffer, "flatbuffer")
        self.backend = backend
        graph = read_tflite(self.flatbuffer)
        self.inputs = [graph.tensor(i) for i in graph.inputs]
        self.outputs = [graph.tensor(i) for i in graph.outputs]
        if backend == "litert":
            from ai_edge_litert.interpreter import Interpreter, OpResolverType

            resolver = {"auto": OpResolverType.AUTO,
                        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                        "reference": OpResolverType.BUILTIN_REF}[kernels]
            self._it = Interpreter(model_content=self.flatbuffer, num_threads=1,
                                   experimental_op_resolver_type=resolver)
            self._it.allocate_tensors()
            self._in = self._it.get_input_details()
            self._out = self._it.get_output_details()
        elif backend == "lce":
            from larq_compute_engine.tflite.python.interpreter import Interpreter

            self._it = Interpreter(self.flatbuffer, num_threads=1)
        else:
            from tflite_micro.python.tflite_micro import runtime

            self._it = runtime.Interpreter.from_bytes(self.flatbuffer, arena_size=arena_size)

    def _batch(self) -> Optional[int]:
        sig = self.inputs[0].shape_signature
        return None if not sig or sig[0] < 0 else sig[0]

    def predict(self, x: Union[np.ndarray, List[np.ndarray]], raw: bool = False,
                chunk: int = 256) -> Union[np.ndarray, List[np.ndarray]]:
        """Outputs for a batch ``x``.

        Args:
            x: an array, or a list of arrays for several inputs; batch first, float values.
            raw: return the integer outputs of a quantized model as they are.
            chunk: batch size per call for a dynamic-batch LiteRT model.

        Returns:
            One array (single output) or a list of arrays, batch first.

        Raises:
            ValueError: the number of arrays is not the number of model inputs.
        """
        xs = [np.asarray(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
        if len(xs) != len(self.inputs):
            raise ValueError(f"the model has {len(self.inputs)} inputs, got {len(xs)} arrays.")
        n = len(xs[0])
        qx = [quantize(a, t.dtype, *_qparams(t)) for a, t in zip(xs, self.inputs)]
        step = self._batch() or min(chunk, max(n, 1))
        if self.backend != "litert":
            step = 1
        outs: List[List[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, n, step):
            parts = [a[start:start + step] for a in qx]
            k = len(parts[0])
            if k < step and self._batch():
                parts = [np.concatenate([p, np.repeat(p[-1:], step - k, axis=0)]) for p in parts]
            for j, y in enumerate(self._invoke(parts)):
                outs[j].append(y[:k])
        res = [np.concatenate(o) for o in outs]
        if not raw:
            res = [dequantize(r, *_qparams(t)) for r, t in zip(res, self.outputs)]
        return res[0] if len(res) == 1 else res

    def _invoke(self, parts: List[np.ndarray]) -> List[np.ndarray]:
        it = self._it
        if self.backend == "litert":
            for d, p in zip(self._in, parts):
                if tuple(d["shape"]) != p.shape:
                    it.resize_tensor_input(d["index"], list(p.shape))
                    it.allocate_tensors()
                    self._in = it.get_input_details()
                    self._out = it.get_output_details()
            for d, p in zip(self._in, parts):
                it.set_tensor(d["index"], p)
            it.invoke()
            return [it.get_tensor(d["index"]).copy() for d in self._out]
        if self.backend == "lce":
            ys = it.interpreter.predict(parts)
            return [np.asarray(y) for y in ys]
        for i, p in enumerate(parts):
            it.set_input(p, i)
        it.invoke()
        return [np.asarray(it.get_output(i)).copy() for i in range(len(self.outputs))]
