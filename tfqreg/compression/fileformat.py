"""The ``.tfqz`` file: a Keras model with entropy-coded quantized kernels.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89TFQZ\\r\\n\\x1a"  (PNG-style: catches text-mode mangling)
    8       2     format version (uint16, currently 1)
    10      2     flags (uint16, 0)
    12      4     header length H (uint32)
    16      8     payload length P (uint64)
    24      H     header: zlib-compressed UTF-8 JSON (architecture as ``model.to_json()``,
                  one entry per weight: name, layer, shape, dtype, bits, step shape, coding
                  mode, offsets of its sections in the payload)
    24+H    P     payload: per weight either raw little-endian values (kept in float) or
                  float32 step(s) + Huffman code tables + packed value / position bit streams
    24+H+P  4     CRC-32 (zlib) of every byte before it

A file that is too short, has another magic, another version, a length that does not match,
or a wrong checksum raises :class:`TfqzError` (a ``ValueError``) naming the problem; a wrong
model is never returned.

Round trip: the decoded kernel is ``float32(δ) · float32(index)``, computed in NumPy. A kernel
that already sits on its grid (as the compression pipeline leaves it, see
:func:`quantize_weights`) is therefore restored bit for bit; any other kernel is quantized on
the way in (``report.settings["max_abs_error"]`` tells how far it moved).

>>> from tfqreg import models
>>> from tfqreg.compression import fileformat
>>> model = models.tiny_cnn()
>>> steps = fileformat.quantize_weights(model, bits=4)        # snap kernels to the 4-bit grid
>>> blob = fileformat.encode_model(model, bits=4, steps=steps)
>>> restored = fileformat.decode_model(blob)
>>> all((a == b).all() for a, b in zip(model.get_weights(), restored.get_weights()))
True
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tfqreg import grid
from tfqreg._keras import check_keras2, keras, tf
from tfqreg.compression import codec
from tfqreg.compression.report import CompressionReport, LayerReport

__all__ = [
    "MAGIC",
    "VERSION",
    "TfqzError",
    "CompressedModel",
    "coded_kernels",
    "quantize_weights",
    "encode_model",
    "decode_model",
    "pack",
    "unpack",
    "save_compressed",
    "load_compressed",
    "inspect_compressed",
]

MAGIC = b"\x89TFQZ\r\n\x1a"
VERSION = 1
_FIXED = struct.Struct("<8sHHIQ")
_CRC = struct.Struct("<I")
_KERNEL_ATTRS = ("kernel", "depthwise_kernel", "pointwise_kernel")


class TfqzError(ValueError):
    """A ``.tfqz`` file (or byte string) is not a valid, intact file of a supported version."""


# ----------------------------------------------------------------------------- checks
def _check_args(bits=None, per_channel=None, narrow_range=None, layers=None, mode=None):
    if bits is not None:
        grid.check_bits(bits, low=2, high=16)
    for name, v in (("per_channel", per_channel), ("narrow_range", narrow_range)):
        if v is not None and not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"`{name}` must be a bool, got {v!r}.")
    if layers is not None and (isinstance(layers, str) or
                               not all(isinstance(n, str) for n in layers)):
        raise TypeError(f"`layers` must be a list of layer names or None, got {layers!r}.")
    if mode is not None:
        codec._check_mode(mode)


# ----------------------------------------------------------------------------- container
def pack(header: dict, payload: bytes) -> bytes:
    """Wrap a header dict and a payload into the ``.tfqz`` byte layout."""
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode("utf-8"), 9)
    body = _FIXED.pack(MAGIC, VERSION, 0, len(head), len(payload)) + head + bytes(payload)
    return body + _CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)


def unpack(data: bytes, source: str = "data") -> Tuple[dict, bytes]:
    """Check and split ``.tfqz`` bytes into ``(header, payload)``.

    Raises:
        TfqzError: wrong magic, unsupported version, truncated / oversized, bad checksum or an
            unreadable header.
    """
    data = bytes(data)
    n = len(data)
    k = min(n, len(MAGIC))
    if data[:k] != MAGIC[:k]:
        raise TfqzError(f"{source} is not a .tfqz file: it starts with {data[:8]!r}, "
                        f"expected the magic bytes {MAGIC!r}.")
    if n < _FIXED.size + _CRC.size:
        raise TfqzError(f"{source} is truncated: {n} bytes, shorter than the "
                        f"{_FIXED.size + _CRC.size}-byte minimum of a .tfqz file.")
    _, version, flags, head_len, pay_len = _FIXED.unpack_from(data)
    if version != VERSION:
        raise TfqzError(f"{source} has .tfqz format version {version}; this tfqreg reads "
                        f"version {VERSION} only.")
    expected = _FIXED.size + head_len + pay_len + _CRC.size
    if n < expected:
        raise TfqzError(f"{source} is truncated: the header announces {expected} bytes, "
                        f"found {n}.")
    if n > expected:
        raise TfqzError(f"{source} has {n - expected} unexpected trailing bytes after the "
                        f"checksum ({expected} bytes announced, {n} found).")
    stored, = _CRC.unpack_from(data, n - _CRC.size)
    computed = zlib.crc32(data[:n - _CRC.size]) & 0xFFFFFFFF
    if stored != computed:
        raise TfqzError(f"{source} is corrupted: CRC-32 mismatch (stored {stored:#010x}, "
                        f"computed {computed:#010x}).")
    if flags != 0:
        raise TfqzError(f"{source} uses unsupported flags {flags:#06x}.")
    start = _FIXED.size
    try:
        header = json.loads(zlib.decompress(data[start:start + head_len]).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TfqzError(f"{source}: unreadable header ({e}).") from e
    return header, data[start + head_len:start + head_len + pay_len]


# ----------------------------------------------------------------------------- kernels
def _leaf_layers(model) -> List[keras.layers.Layer]:
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if not list(l._flatten_layers(include_self=False, recursive=False))]


def coded_kernels(model, layers: Optional[Sequence[str]] = None) -> Dict[str, tuple]:
    """The kernels that get quantized and coded: ``{"layer/attr": (layer, variable,
    channel_axes)}`` for every ``kernel`` / ``depthwise_kernel`` / ``pointwise_kernel`` of the
    model's layers (Dense, Conv, DepthwiseConv, SeparableConv, ...), or of the named layers.

    ``channel_axes`` (used for per-channel steps) is :func:`tfqreg.grid.channel_axes_for`, else
    the last two axes for a depthwise kernel and the last axis otherwise.

    Raises:
        ValueError: a name in ``layers`` is not a layer with a kernel.
    """
    check_keras2(model, "model")
    _check_args(layers=layers)
    found = {}
    for layer in _leaf_layers(model):
        if layers is not None and layer.name not in layers:
            continue
        for attr in _KERNEL_ATTRS:
            var = getattr(layer, attr, None)
            if isinstance(var, tf.Variable):
                if attr == "depthwise_kernel":
                    ax = (-2, -1)
                else:
                    ax = (-1,) if attr == "pointwise_kernel" else None
                    ax = ax or grid.channel_axes_for(layer) or (-1,)
                found[f"{layer.name}/{attr}"] = (layer, var, ax)
    if layers is not None:
        named = {k.split("/")[0] for k in found}
        missing = [n for n in layers if n not in named]
        if missing:
            raise ValueError(f"`layers`: {missing} are not Dense/Conv layers with a kernel in "
                             f"the model (have {sorted(named)}).")
    return found


def _step_array(var, bits, steps, key, per_channel, axes) -> np.ndarray:
    if steps is not None and key in steps:
        step = np.asarray(steps[key], dtype=np.float32)
    else:
        step = grid.default_step(var, bits, axes if per_channel else None).numpy()
        step = np.asarray(step, dtype=np.float32)
    shape = tuple(var.shape)
    try:
        np.broadcast_to(step, shape)
    except ValueError as e:
        raise ValueError(f"`steps[{key!r}]` of shape {step.shape} does not broadcast to the "
                         f"kernel shape {shape}.") from e
    if step.ndim not in (0, len(shape)):
        step = step.reshape([1] * (len(shape) - step.ndim) + list(step.shape))
    if not np.all(np.isfinite(step)) or np.any(step <= 0):
        raise ValueError(f"`steps[{key!r}]` must be finite and > 0.")
    return step


def _indices(w: np.ndarray, step: np.ndarray, bits: int, narrow_range: bool) -> np.ndarray:
    q = grid.quantize_indices(tf.constant(w, tf.float32), tf.constant(step), bits, narrow_range)
    return q.numpy().astype(np.int64)


def _dequantize(q: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The ONE dequantization formula shared by the encoder and the decoder."""
    return (step.astype(np.float32) * q.astype(np.float32)).astype(np.float32)


def quantize_weights(
    model,
    bits: int,
    steps: Optional[Mapping[str, object]] = None,
    per_channel: bool = False,
    narrow_range: bool = False,
    layers: Optional[Sequence[str]] = None,
) -> Dict[str, np.ndarray]:
    """Snap the model's kernels in place to ``δ · index`` (exactly the values the decoder
    produces) and return the float32 steps ``{"layer/attr": δ}``.

    Zeros stay zero (0 is on the symmetric grid). Steps not given in ``steps`` default to
    :func:`tfqreg.grid.default_step` (per channel if ``per_channel``).
    """
    check_keras2(model, "model")
    _check_args(bits, per_channel, narrow_range, layers)
    out = {}
    for key, (_, var, axes) in coded_kernels(model, layers).items():
        step = _step_array(var, bits, steps, key, per_channel, axes)
        w = var.numpy()
        var.assign(_dequantize(_indices(w, step, bits, narrow_range), step))
        out[key] = step
    return out


# ----------------------------------------------------------------------------- model codec
@dataclass
class CompressedModel:
    """A coded model in memory: the ``header`` dict, the ``payload`` and its report."""

    header: dict
    payload: bytes
    report: CompressionReport = field(default=None)

    def to_bytes(self) -> bytes:
        return pack(self.header, self.payload)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "data") -> "CompressedModel":
        header, payload = unpack(data, source)
        rep = header.get("report")
        report = CompressionReport.from_dict(rep) if rep else None
        if report is not None:
            report.file_bytes = len(data)
        return cls(header, payload, report)

    def refresh_report(self) -> "CompressedModel":
        """Store the (possibly updated, e.g. with accuracies) report in the header and re-measure
        ``report.file_bytes``."""
        self.report.file_bytes = None
        self.header["report"] = self.report.to_dict()
        self.report.file_bytes = len(self.to_bytes())
        return self

    def save(self, path: Union[str, os.PathLike]) -> int:
        """Write the ``.tfqz`` file; returns its size in bytes."""
        data = self.to_bytes()
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def to_model(self, custom_objects: Optional[dict] = None) -> keras.Model:
        return decode_model(self, custom_objects)


def encode_model(
    model,
    bits: int = 4,
    steps: Optional[Mapping[str, object]] = None,
    per_channel: bool = False,
    narrow_range: bool = False,
    layers: Optional[Sequence[str]] = None,
    mode: str = "auto",
) -> CompressedModel:
    """Quantize (with ``steps``) and entropy-code every kernel; keep other weights in float.

    Args:
        model: a Sequential or Functional Keras 2 model (it must have ``to_json``).
        bits: grid bit width, 2..16.
        steps: ``{"layer/attr": δ}`` as returned by :func:`quantize_weights` or the pipeline;
            missing entries use the default step.
        per_channel: default steps per output channel.
        narrow_range: use ``[-(2^(n-1)-1), 2^(n-1)-1]``.
        layers: only code the kernels of these layers (default: all Dense/Conv kernels).
        mode: ``"auto"`` (smaller of sparse/dense per kernel), ``"sparse"`` or ``"dense"``.

    Returns:
        A :class:`CompressedModel` whose ``report`` holds the byte accounting.
    """
    check_keras2(model, "model")
    _check_args(bits, per_channel, narrow_range, layers, mode)
    if not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        # a subclassed model's to_json() "works" but the file could never be decoded
        raise TypeError("`model` must be a Sequential or Functional model (a subclassed "
                        f"{type(model).__name__} has no architecture config to store).")
    try:
        architecture = model.to_json()
    except NotImplementedError as e:
        raise TypeError("`model` must be a Sequential or Functional model (subclassed models "
                        "have no architecture config to store).") from e
    coded = coded_kernels(model, layers)
    unknown = sorted(set(steps or {}) - set(coded))
    if unknown:
        raise ValueError(f"`steps` has keys that are not coded kernels of the model: {unknown}; "
                         f"the coded kernels are {sorted(coded)}.")
    kernels = {id(v): (k, l, a) for k, (l, v, a) in coded.items()}
    owner = {}
    for layer in _leaf_layers(model):
        for w in layer.weights:
            owner.setdefault(id(w), layer.name)
    payload = bytearray()
    entries, per_layer, max_err = [], {}, 0.0

    def put(blob: bytes) -> List[int]:
        payload.extend(blob)
        return [len(payload) - len(blob), len(blob)]

    for var in model.weights:
        value = np.asarray(var.numpy())
        layer_name = owner.get(id(var), var.name.split("/")[0])
        rep = per_layer.setdefault(layer_name, LayerReport(layer_name, None, 0, 0))
        rep.params += int(value.size)
        rep.float32_bytes += 4 * int(value.size)
        entry = {"name": var.name, "layer": layer_name, "shape": list(value.shape),
                 "dtype": value.dtype.str}
        if id(var) in kernels:
            key, _, axes = kernels[id(var)]
            if value.dtype != np.float32:
                raise TypeError(f"kernel {key} is {value.dtype}; only float32 kernels are coded.")
            step = _step_array(var, bits, steps, key, per_channel, axes)
            q = _indices(value, step, bits, narrow_range)
            max_err = max(max_err, float(np.max(np.abs(_dequantize(q, step) - value),
                                                initial=0.0)))
            enc = codec.encode(q, mode)
            entry.update(kind="coded", key=key, bits=bits, narrow_range=bool(narrow_range),
                         step_shape=list(step.shape), step=put(step.astype("<f4").tobytes()),
                         mode=enc.mode, size=enc.size, nnz=enc.nnz,
                         sections=[put(s) for s in enc.sections()])
            zeros = rep.pruned_fraction * rep.kernel_params + (enc.size - enc.nnz)
            rep.kernel_shape = tuple(value.shape) if rep.kernel_shape is None else rep.kernel_shape
            rep.kernel_params += int(value.size)
            rep.bits = bits
            rep.mode = enc.mode if rep.mode in ("float", enc.mode) else "mixed"
            rep.pruned_fraction = zeros / rep.kernel_params if rep.kernel_params else 0.0
            rep.coded_bytes += enc.coded_bytes
            rep.table_bytes += enc.table_bytes
            rep.index_bytes += enc.index_bytes
            rep.step_bytes += 4 * int(step.size)
            rep.index_entropy_bytes += enc.index_entropy_bits / 8
            rep.stream_entropy_bytes += enc.stream_entropy_bits / 8
            rep.other_mode_bytes += enc.other_mode_bytes
        else:
            entry.update(kind="float", data=put(value.astype(value.dtype.newbyteorder("<"))
                                                .tobytes()))
            rep.float_bytes += int(value.nbytes)
        entries.append(entry)
    from tfqreg import __version__

    report = CompressionReport(
        list(per_layer.values()),
        settings={"bits": bits, "per_channel": bool(per_channel),
                  "narrow_range": bool(narrow_range), "mode": mode,
                  "max_abs_error": max_err, "lossless": max_err == 0.0},
    )
    header = {"format": "tfqz", "tfqreg_version": __version__, "architecture": architecture,
              "weights": entries}
    header["report"] = report.to_dict()  # stored without file_bytes (set on reading)
    compressed = CompressedModel(header, bytes(payload), report)
    report.file_bytes = len(compressed.to_bytes())
    return compressed


def _section(payload: bytes, span, what: str) -> bytes:
    off, length = (int(v) for v in span)
    if off < 0 or length < 0 or off + length > len(payload):
        raise TfqzError(f"{what}: section [{off}, {off + length}) outside the payload.")
    return payload[off:off + length]


def decode_model(compressed: Union[CompressedModel, bytes],
                 custom_objects: Optional[dict] = None) -> keras.Model:
    """Rebuild the Keras model from a :class:`CompressedModel` (or ``.tfqz`` bytes)."""
    if isinstance(compressed, (bytes, bytearray, memoryview)):
        compressed = CompressedModel.from_bytes(bytes(compressed))
    header, payload = compressed.header, compressed.payload
    try:
        model = keras.models.model_from_json(header["architecture"],
                                             custom_objects=custom_objects)
    except (KeyError, ValueError, TypeError) as e:
        raise TfqzError(f"cannot rebuild the architecture: {e}") from e
    entries = header.get("weights", [])
    if len(entries) != len(model.weights):
        raise TfqzError(f"the file holds {len(entries)} weights, the rebuilt model has "
                        f"{len(model.weights)}.")
    values = []
    for e in entries:
        shape = tuple(e["shape"])
        if e["kind"] == "float":
            arr = np.frombuffer(_section(payload, e["data"], e["name"]), dtype=np.dtype(e["dtype"]))
        elif e["kind"] == "coded":
            step = np.frombuffer(_section(payload, e["step"], e["name"]), dtype="<f4")
            step = step.reshape(e["step_shape"])
            enc = codec.EncodedTensor(
                e["mode"], int(e["size"]), int(e["nnz"]),
                *(_section(payload, e["sections"][i], e["name"]) for i in (0, 1)), 0,
                *(_section(payload, e["sections"][i], e["name"]) for i in (2, 3)))
            try:
                q = codec.decode(enc)
            except ValueError as err:
                raise TfqzError(f"{e['name']}: cannot decode ({err}).") from err
            arr = _dequantize(q.reshape(shape), step)
        else:
            raise TfqzError(f"{e['name']}: unknown weight kind {e['kind']!r}.")
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise TfqzError(f"{e['name']}: {arr.size} values for shape {shape}.")
        values.append(arr.reshape(shape))
    model.set_weights(values)
    return model


# ----------------------------------------------------------------------------- files
def save_compressed(model, path: Union[str, os.PathLike], bits: int = 4,
                    steps: Optional[Mapping[str, object]] = None, per_channel: bool = False,
                    narrow_range: bool = False, layers: Optional[Sequence[str]] = None,
                    mode: str = "auto") -> CompressionReport:
    """Encode ``model`` (see :func:`encode_model`) and write it to ``path`` (``.tfqz``).

    Returns:
        The :class:`~tfqreg.compression.report.CompressionReport` (with ``file_bytes``).
    """
    compressed = encode_model(model, bits, steps, per_channel, narrow_range, layers, mode)
    compressed.save(path)
    return compressed.report


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_compressed(path: Union[str, os.PathLike],
                    custom_objects: Optional[dict] = None) -> keras.Model:
    """Read a ``.tfqz`` file and return the decoded Keras model.

    Raises:
        TfqzError: the file is truncated, corrupted, not a ``.tfqz`` file, or of another
            format version.
    """
    return decode_model(CompressedModel.from_bytes(_read(path), source=str(path)),
                        custom_objects)


def inspect_compressed(path: Union[str, os.PathLike]) -> CompressionReport:
    """The report stored in a ``.tfqz`` file (the file is checked, the model not built)."""
    compressed = CompressedModel.from_bytes(_read(path), source=str(path))
    if compressed.report is None:
        raise TfqzError(f"{path} carries no report.")
    return compressed.report
