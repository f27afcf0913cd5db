"""Entropy coding of one tensor's quantized integer indices, dense or sparse.

Two representations, both canonical-Huffman coded (:mod:`tfqreg.compression.huffman`):

``dense``
    one Huffman code over all indices, zero included as a symbol.
``sparse``
    the non-zero indices (Huffman over the values) plus their positions as a *gap stream*:
    for each non-zero, the number of zeros since the previous one (Huffman over the gaps).
    Zeros after the last non-zero cost nothing (the tensor size is known).

With 80 % zeros the dense code spends at least one bit on every zero although a zero carries
only ``-log2(0.8) = 0.32`` bits; the gap stream codes the mask near its entropy. :func:`encode`
with ``mode="auto"`` builds both and keeps the smaller (code tables included).

>>> import numpy as np
>>> from tfqreg.compression import codec
>>> q = np.array([0, 0, 3, 0, 0, 0, -1, 0, 0, 0, 0, 0, 3, 0, 0, 0])
>>> enc = codec.encode(q, mode="sparse")
>>> enc.mode, enc.nnz, enc.position_symbols().tolist()
('sparse', 3, [2, 3, 5])
>>> codec.decode(enc).tolist() == q.tolist()
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from tfqreg.compression import huffman

__all__ = ["MODES", "EncodedTensor", "encode", "decode", "gaps_from_mask", "positions_from_gaps"]

MODES = ("auto", "sparse", "dense")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    return mode


def gaps_from_mask(nonzero: np.ndarray) -> np.ndarray:
    """Zeros before each non-zero (flat order): ``pos_i − pos_{i−1} − 1`` with ``pos_{−1} = −1``."""
    pos = np.flatnonzero(np.asarray(nonzero).reshape(-1))
    return np.diff(pos, prepend=-1) - 1


def positions_from_gaps(gaps: np.ndarray) -> np.ndarray:
    """Inverse of :func:`gaps_from_mask`: flat positions of the non-zeros."""
    gaps = np.asarray(gaps, dtype=np.int64)
    return np.cumsum(gaps + 1) - 1


@dataclass(frozen=True)
class EncodedTensor:
    """The coded form of one integer tensor (flat, C order) and its entropy statistics.

    Attributes:
        mode: ``"sparse"`` or ``"dense"``.
        size: number of indices.
        nnz: number of non-zero indices.
        value_table, value_payload, value_bits: Huffman table, packed bits and bit count of the
            value stream (all indices when dense, the non-zeros when sparse).
        position_table, position_payload, position_bits: the same for the gap stream (empty
            when dense).
        index_entropy_bits: ``size · H(indices)``, the zeroth-order entropy of all indices.
        value_entropy_bits, position_entropy_bits: zeroth-order entropy of the coded streams.
        other_mode_bytes: total bytes the representation not chosen would have taken.
    """

    mode: str
    size: int
    nnz: int
    value_table: bytes
    value_payload: bytes
    value_bits: int
    position_table: bytes = b""
    position_payload: bytes = b""
    position_bits: int = 0
    index_entropy_bits: float = 0.0
    value_entropy_bits: float = 0.0
    position_entropy_bits: float = 0.0
    other_mode_bytes: int = 0

    @property
    def table_bytes(self) -> int:
        return len(self.value_table) + len(self.position_table)

    @property
    def coded_bytes(self) -> int:
        return len(self.value_payload)

    @property
    def index_bytes(self) -> int:
        return len(self.position_payload)

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.coded_bytes + self.index_bytes

    @property
    def stream_entropy_bits(self) -> float:
        return self.value_entropy_bits + self.position_entropy_bits

    def sections(self) -> Tuple[bytes, bytes, bytes, bytes]:
        return self.value_table, self.value_payload, self.position_table, self.position_payload

    def position_symbols(self) -> np.ndarray:
        """The decoded gap stream (sparse mode)."""
        if self.mode != "sparse":
            return np.zeros(0, dtype=np.int64)
        return huffman.decode_stream(self.position_table, self.position_payload, self.nnz)


def _dense(q: np.ndarray, index_entropy: float) -> EncodedTensor:
    table, payload, nbits = huffman.encode_stream(q)
    return EncodedTensor("dense", q.size, int(np.count_nonzero(q)), table, payload, nbits,
                         index_entropy_bits=index_entropy, value_entropy_bits=index_entropy)


def _sparse(q: np.ndarray, index_entropy: float) -> EncodedTensor:
    nz = q != 0
    values = q[nz]
    gaps = gaps_from_mask(nz)
    vt, vp, vb = huffman.encode_stream(values)
    pt, pp, pb = huffman.encode_stream(gaps)
    return EncodedTensor(
        "sparse", q.size, int(values.size), vt, vp, vb, pt, pp, pb,
        index_entropy_bits=index_entropy,
        value_entropy_bits=huffman.entropy_bits(values),
        position_entropy_bits=huffman.entropy_bits(gaps),
    )


def encode(indices, mode: str = "auto") -> EncodedTensor:
    """Huffman-code an integer tensor, dense, sparse or whichever is smaller (``"auto"``)."""
    _check_mode(mode)
    q = np.asarray(indices)
    if q.size and not np.all(q == np.round(q)):
        raise ValueError("`indices` must hold integers (quantized grid indices).")
    q = q.reshape(-1).astype(np.int64)
    h = huffman.entropy_bits(q)
    if mode == "dense":
        return _dense(q, h)
    if mode == "sparse":
        return _sparse(q, h)
    dense, sparse = _dense(q, h), _sparse(q, h)
    if sparse.total_bytes <= dense.total_bytes:
        return _replace_other(sparse, dense.total_bytes)
    return _replace_other(dense, sparse.total_bytes)


def _replace_other(enc: EncodedTensor, other: int) -> EncodedTensor:
    from dataclasses import replace

    return replace(enc, other_mode_bytes=int(other))


def decode(enc: EncodedTensor) -> np.ndarray:
    """Flat ``int64`` indices back from an :class:`EncodedTensor`."""
    if enc.mode == "dense":
        return huffman.decode_stream(enc.value_table, enc.value_payload, enc.size)
    if enc.mode != "sparse":
        raise ValueError(f"unknown coding mode {enc.mode!r}.")
    out = np.zeros(enc.size, dtype=np.int64)
    if enc.nnz:
        values = huffman.decode_stream(enc.value_table, enc.value_payload, enc.nnz)
        pos = positions_from_gaps(enc.position_symbols())
        if pos.size and (pos[-1] >= enc.size or pos.min() < 0):
            raise ValueError("position stream points outside the tensor.")
        out[pos] = values
    return out
