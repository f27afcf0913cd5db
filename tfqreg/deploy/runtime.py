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

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from tfqreg.deploy.tflite_file import TensorInfo, as_flatbuffer, read_tflite

__all__ = ["BACKENDS", "KERNELS", "quantize", "dequantize", "Runner"]

BACKENDS = ("litert", "lce", "micro")
KERNELS = ("auto", "builtin", "reference")


def quantize(x: np.ndarray, dtype: Any, scale: float, zero_point: int,
             name: str = "x") -> np.ndarray:
    """``x`` as ``dtype``: float dtypes are a cast; quantized integer ones
    ``round(x / scale + zp)``, clipped to the dtype's range; integer ones without a scale (an
    ``Embedding``'s token ids, which TFLite does not quantize) take integer ``x`` as it is.

    Raises:
        TypeError: float ``x`` for an integer tensor without a scale (the message names
            ``name``).
    """
    dtype = np.dtype(dtype)
    x = np.asarray(x)
    if dtype.kind == "f":
        return x.astype(dtype)
    if not scale:
        if x.dtype.kind not in "iub":
            raise TypeError(f"`{name}` has dtype {x.dtype}, but the model input takes {dtype} "
                            "values as they are (e.g. token ids; TFLite does not quantize "
                            "integer inputs): pass an integer array.")
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32 (a float array, or no scale: a cast)."""
    if np.dtype(q.dtype).kind == "f" or not scale:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _order(name: str, names: Optional[Sequence[str]], have: List[str]) -> Optional[List[str]]:
    """``names`` checked to be the file's names in some order (``None`` passes)."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"`{name}` must be a list of names, got {names!r}.")
    if sorted(names) != sorted(have):
        raise ValueError(f"`{name}` {list(names)} are not the model's names {have}.")
    return list(names)


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
        input_names: the order in which :meth:`predict` takes a LIST of arrays, by input name
            (e.g. Keras' ``model.input_names``); ``None``: the file's order
            (:attr:`input_names`). The converter may order a model's inputs differently from
            Keras, so inputs are matched by name, never by position alone.
        output_names: the order of the outputs :meth:`predict` returns, by name (Keras'
            ``model.output_names``); ``None``: the file's order.

    Attributes:
        input_names / output_names: the file's inputs / outputs by name (signature names,
            which the converter takes from the Keras inputs / output layers), in file order.

    Raises:
        ValueError: an unknown ``backend`` / ``kernels``, bytes that are not a (valid) TFLite
            flatbuffer, ``input_names`` / ``output_names`` that are not the file's names, or
            inputs of unknown height/width (``-1`` past the batch axis) for the ``"micro"`` or
            ``"lce"`` backend, which need static shapes.
    """

    BACKENDS = BACKENDS
    KERNELS = KERNELS

    def __init__(self, flatbuffer: Any, backend: str = "litert",
                 arena_size: Optional[int] = None, kernels: str = "auto",
                 input_names: Optional[Sequence[str]] = None,
                 output_names: Optional[Sequence[str]] = None):
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
        self.input_names = [graph.input_name(k) for k in range(len(graph.inputs))]
        out_by_index = {i: n for n, i in graph.signature_outputs.items()}
        self.output_names = [out_by_index.get(i, graph.tensor(i).name) for i in graph.outputs]
        self._in_order = _order("input_names", input_names, self.input_names)
        self._out_order = _order("output_names", output_names, self.output_names)
        dynamic = {n: t.shape_signature for n, t in zip(self.input_names, self.inputs)
                   if any(d < 0 for d in t.shape_signature[1:])}
        if dynamic and backend != "litert":
            raise ValueError(
                f"`backend`={backend!r} needs static input shapes, but input(s) {dynamic} have "
                "axes of unknown size (-1): convert the model with a fixed input shape, e.g. "
                "keras.Input(shape=(28, 28, 1)), or run it with backend='litert'.")
        self._allocated = False
        if backend == "litert":
            from ai_edge_litert.interpreter import Interpreter, OpResolverType

            resolver = {"auto": OpResolverType.AUTO,
                        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                        "reference": OpResolverType.BUILTIN_REF}[kernels]
            self._it = Interpreter(model_content=self.flatbuffer, num_threads=1,
                                   experimental_op_resolver_type=resolver)
            if not dynamic:  # unknown H x W: allocated once the first batch gives the shape
                self._it.allocate_tensors()
                self._allocated = True
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

    def _arrays(self, x: Any) -> List[np.ndarray]:
        """``x`` (an array, a list in :meth:`__init__`'s ``input_names`` order, or a dict by
        name) as one array per input, in file order."""
        if isinstance(x, dict):
            if set(x) != set(self.input_names):
                raise ValueError(f"`x` has the inputs {sorted(x)}, but the model's inputs are "
                                 f"{self.input_names}.")
            return [np.asarray(x[n]) for n in self.input_names]
        xs = [np.asarray(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
        if len(xs) != len(self.inputs):
            raise ValueError(f"`x`: the model has {len(self.inputs)} inputs "
                             f"{self.input_names}, got {len(xs)} arrays.")
        if self._in_order is None:
            return xs
        by_name = dict(zip(self._in_order, xs))
        return [by_name[n] for n in self.input_names]

    def predict(self, x: Union[np.ndarray, List[np.ndarray], Dict[str, np.ndarray]],
                raw: bool = False, chunk: int = 256) -> Union[np.ndarray, List[np.ndarray]]:
        """Outputs for a batch ``x``.

        Args:
            x: an array; for several inputs a dict ``{input name: array}`` or a list of arrays
                in the ``input_names`` order given to the runner (default: the file's order,
                :attr:`input_names`); batch first, float values (integer ones for integer
                inputs that are not quantized, e.g. token ids).
            raw: return the integer outputs of a quantized model as they are.
            chunk: batch size per call for a dynamic-batch LiteRT model.

        Returns:
            One array (single output) or a list of arrays, batch first, in the
            ``output_names`` order given to the runner (default: the file's order).

        Raises:
            ValueError: the number (or names) of arrays is not that of the model inputs, or
                they hold different numbers of samples.
            TypeError: float values for an integer input that is not quantized.
        """
        xs = self._arrays(x)
        n = len(xs[0])
        if any(len(a) != n for a in xs):
            raise ValueError(f"`x`: the inputs hold different numbers of samples "
                             f"{[len(a) for a in xs]}.")
        qx = [quantize(a, t.dtype, *_qparams(t), name=f"x['{name}']")
              for a, t, name in zip(xs, self.inputs, self.input_names)]
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
        if self._out_order is not None:
            by_name = dict(zip(self.output_names, res))
            res = [by_name[n] for n in self._out_order]
        return res[0] if len(res) == 1 else res

    def _invoke(self, parts: List[np.ndarray]) -> List[np.ndarray]:
        it = self._it
        if self.backend == "litert":
            resized = False
            for d, p in zip(self._in, parts):
                if tuple(d["shape"]) != p.shape:
                    it.resize_tensor_input(d["index"], list(p.shape))
                    resized = True
            if resized or not self._allocated:
                it.allocate_tensors()
                self._allocated = True
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
