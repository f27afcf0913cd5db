"""Canonical Huffman coding of integer streams, in NumPy (no compression library involved).

Three steps, each a small function:

1. :func:`code_lengths` – optimal (Huffman) code lengths from symbol frequencies, by the
   two-queue method on sorted weights (linear after sorting). A single-symbol alphabet gets
   length 0 (the decoder knows how many symbols to emit, so no bits are needed).
2. :func:`canonical_codes` – the canonical code for those lengths: symbols sorted by
   ``(length, symbol)`` get consecutive code values, so the lengths alone define the code and
   the *code table* that has to be stored is just ``(symbol, length)`` pairs
   (:func:`pack_table` / :func:`unpack_table`).
3. :func:`encode` / :func:`decode` – pack the codes MSB-first into bytes and back.

:class:`HuffmanCode` wraps these for one alphabet; :func:`encode_stream` /
:func:`decode_stream` produce / consume ``table bytes + payload bytes`` for a whole stream.

>>> import numpy as np
>>> from tfqreg.compression import huffman
>>> x = np.array([0, 0, 0, 0, 1, 1, -1, 3])
>>> code = huffman.HuffmanCode.from_data(x)
>>> code.lengths
{-1: 3, 0: 1, 1: 2, 3: 3}
>>> payload, nbits = code.encode(x)
>>> nbits, len(payload)                      # 4*1 + 2*2 + 3 + 3 bits
(14, 2)
>>> code.decode(payload, len(x)).tolist()
[0, 0, 0, 0, 1, 1, -1, 3]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import numpy as np

__all__ = [
    "MAX_CODE_LENGTH",
    "code_lengths",
    "canonical_codes",
    "entropy_bits",
    "encode",
    "decode",
    "pack_table",
    "unpack_table",
    "HuffmanCode",
    "encode_stream",
    "decode_stream",
    "write_varint",
    "read_varint",
]

MAX_CODE_LENGTH = 63  # codes are handled as uint64; a Huffman code this long needs > 2^44 symbols
_TABLE_DECODE_MAX = 16  # decode through a 2^L lookup table up to this code length


# ----------------------------------------------------------------------------- checks
def _check_symbols(x, name: str = "symbols") -> np.ndarray:
    arr = np.asarray(x)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise TypeError(f"`{name}` must hold integers, got dtype {arr.dtype}.")
    return arr.reshape(-1).astype(np.int64)


def _check_frequencies(freqs: Mapping[int, int]) -> Dict[int, int]:
    if not isinstance(freqs, Mapping):
        raise TypeError(f"`freqs` must be a mapping symbol -> count, got {type(freqs).__name__}.")
    out = {}
    for s, f in freqs.items():
        if int(f) != f or f < 0:
            raise ValueError(f"`freqs` must hold non-negative integer counts, got {s!r}: {f!r}.")
        if f > 0:
            out[int(s)] = int(f)
    return out


# ----------------------------------------------------------------------------- lengths
def code_lengths(freqs: Mapping[int, int]) -> Dict[int, int]:
    """Huffman code lengths for ``{symbol: count}`` (symbols with count 0 are dropped).

    Two-queue construction: leaves sorted by count form the first queue, merged nodes are
    produced in non-decreasing order into the second, so the two smallest are always at the
    queue fronts. Ties prefer leaves, which gives the minimum-variance code among the optimal
    ones. Lengths are then the depths of the leaves.

    Returns:
        ``{symbol: length}``; ``{}`` for an empty alphabet, ``{s: 0}`` for a single symbol.
    """
    freqs = _check_frequencies(freqs)
    if not freqs:
        return {}
    if len(freqs) == 1:
        return {next(iter(freqs)): 0}
    symbols = sorted(freqs, key=lambda s: (freqs[s], s))
    n = len(symbols)
    weight = [freqs[s] for s in symbols] + [0] * (n - 1)
    parent = [-1] * (2 * n - 1)
    leaf, node, made = 0, n, n  # front of leaf queue, front of node queue, next node id

    def pop():
        nonlocal leaf, node
        if leaf < n and (node >= made or weight[leaf] <= weight[node]):
            leaf += 1
            return leaf - 1
        node += 1
        return node - 1

    for _ in range(n - 1):
        a, b = pop(), pop()
        weight[made] = weight[a] + weight[b]
        parent[a] = parent[b] = made
        made += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):  # parents have larger ids: fill depths top-down
        depth[i] = depth[parent[i]] + 1
    lengths = {symbols[i]: depth[i] for i in range(n)}
    if max(lengths.values()) > MAX_CODE_LENGTH:  # pragma: no cover - needs > 2^44 symbols
        raise ValueError(f"a code length exceeds {MAX_CODE_LENGTH} bits.")
    return lengths


def canonical_codes(lengths: Mapping[int, int]) -> Dict[int, Tuple[int, int]]:
    """Canonical code ``{symbol: (code value, length)}`` for given lengths.

    Symbols sorted by ``(length, symbol)`` get consecutive codes; moving to a longer length
    shifts left. Raises ``ValueError`` if the lengths violate Kraft's inequality.
    """
    items = sorted(((int(l), int(s)) for s, l in lengths.items()))
    if len(items) == 1:
        return {items[0][1]: (0, items[0][0])}
    if any(l < 1 or l > MAX_CODE_LENGTH for l, _ in items):
        raise ValueError(f"code lengths must be in 1..{MAX_CODE_LENGTH} for 2+ symbols.")
    if sum(2.0 ** -l for l, _ in items) > 1.0 + 1e-12:
        raise ValueError("code lengths violate Kraft's inequality; not a prefix code.")
    codes, code, prev = {}, 0, items[0][0] if items else 0
    for length, sym in items:
        code <<= length - prev
        codes[sym] = (code, length)
        code += 1
        prev = length
    return codes


def entropy_bits(x) -> float:
    """Total Shannon (zeroth-order) entropy of a stream in bits: ``N · H(p̂)``, with ``p̂`` the
    empirical symbol frequencies. A lower bound for any symbol-by-symbol prefix code."""
    x = _check_symbols(x)
    if x.size == 0:
        return 0.0
    _, counts = np.unique(x, return_counts=True)
    p = counts / x.size
    return float(-(counts * np.log2(p)).sum())


# ----------------------------------------------------------------------------- bits
def encode(x, codes: Mapping[int, Tuple[int, int]]) -> Tuple[bytes, int]:
    """Pack the codes of ``x`` MSB-first. Returns ``(bytes, number of bits)``; the last byte is
    zero-padded."""
    x = _check_symbols(x)
    if x.size == 0:
        return b"", 0
    syms = np.array(sorted(codes), dtype=np.int64)
    pos = np.searchsorted(syms, x)
    if np.any(pos >= syms.size) or np.any(syms[np.minimum(pos, syms.size - 1)] != x):
        missing = sorted(set(np.unique(x).tolist()) - set(syms.tolist()))
        raise ValueError(f"symbols {missing[:10]} are not in the code table.")
    values = np.array([codes[s][0] for s in syms.tolist()], dtype=np.uint64)[pos]
    lens = np.array([codes[s][1] for s in syms.tolist()], dtype=np.int64)[pos]
    total = int(lens.sum())
    if total == 0:
        return b"", 0
    owner = np.repeat(np.arange(x.size), lens)
    starts = np.cumsum(lens) - lens
    offset = np.arange(total) - starts[owner]
    shift = (lens[owner] - 1 - offset).astype(np.uint64)
    bits = ((values[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes(), total


def decode(data: bytes, count: int, lengths: Mapping[int, int]) -> np.ndarray:
    """Decode ``count`` symbols from ``data`` with the canonical code of ``lengths``.

    Raises ``ValueError`` if the bits run out or hit an unused code.
    """
    count = int(count)
    if count < 0:
        raise ValueError(f"`count` must be >= 0, got {count}.")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if not lengths:
        raise ValueError("cannot decode symbols with an empty code table.")
    codes = canonical_codes(lengths)
    if len(codes) == 1:
        return np.full(count, next(iter(codes)), dtype=np.int64)
    max_len = max(l for _, l in codes.values())
    bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8))
    if max_len <= _TABLE_DECODE_MAX:
        return _decode_table(bits, count, codes, max_len)
    return _decode_canonical(bits, count, codes)


def _decode_table(bits, count, codes, max_len) -> np.ndarray:
    size = 1 << max_len
    sym_tab = np.zeros(size, dtype=np.int64)
    len_tab = np.zeros(size, dtype=np.int64)  # 0 marks an unused code
    for sym, (code, length) in codes.items():
        lo = code << (max_len - length)
        hi = (code + 1) << (max_len - length)
        sym_tab[lo:hi] = sym
        len_tab[lo:hi] = length
    padded = np.concatenate([bits, np.zeros(max_len, dtype=np.uint8)]).astype(np.int64)
    window = np.zeros(bits.size + 1, dtype=np.int64)
    for k in range(max_len):  # window[p] = the max_len bits starting at bit p
        window = (window << 1) | padded[k:k + bits.size + 1]
    window = window.tolist()
    lens = len_tab.tolist()
    out_idx = [0] * count
    p, nbits = 0, bits.size
    for i in range(count):
        if p >= nbits:
            raise ValueError(f"Huffman stream ended after {i} of {count} symbols.")
        w = window[p]
        length = lens[w]
        if length == 0:
            raise ValueError(f"invalid Huffman code at bit {p}.")
        out_idx[i] = w
        p += length
    if p > nbits:
        raise ValueError(f"Huffman stream ended inside the last of {count} symbols.")
    return sym_tab[np.array(out_idx, dtype=np.int64)]


def _decode_canonical(bits, count, codes) -> np.ndarray:
    """Bit-by-bit canonical decoding (first code / count per length), for long codes."""
    by_length: Dict[int, list] = {}
    for sym, (code, length) in sorted(codes.items(), key=lambda kv: kv[1]):
        by_length.setdefault(length, []).append(sym)
    first = {l: codes[syms[0]][0] for l, syms in by_length.items()}
    bits = bits.tolist()
    out, p = [], 0
    for i in range(count):
        code, length = 0, 0
        while True:
            if p >= len(bits):
                raise ValueError(f"Huffman stream ended after {i} of {count} symbols.")
            code = (code << 1) | bits[p]
            p += 1
            length += 1
            syms = by_length.get(length)
            if syms is not None and 0 <= code - first[length] < len(syms):
                out.append(syms[code - first[length]])
                break
            if length > MAX_CODE_LENGTH:
                raise ValueError(f"invalid Huffman code at bit {p}.")
    return np.array(out, dtype=np.int64)


# ----------------------------------------------------------------------------- table bytes
def write_varint(value: int) -> bytes:
    """LEB128 unsigned varint."""
    value = int(value)
    if value < 0:
        raise ValueError(f"varint must be >= 0, got {value}.")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    """Read a LEB128 varint at ``pos``; returns ``(value, new pos)``."""
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in code table.")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 70:
            raise ValueError("malformed varint in code table.")


def _zigzag(v: int) -> int:
    return (v << 1) if v >= 0 else ((-v << 1) - 1)


def _unzigzag(u: int) -> int:
    return (u >> 1) if not u & 1 else -((u + 1) >> 1)


def pack_table(lengths: Mapping[int, int]) -> bytes:
    """Serialize a canonical code table: ``varint K``, the K symbols ascending (first as a
    zig-zag varint, then gaps ``s_i − s_{i−1} − 1`` as varints), then K length bytes."""
    syms = sorted(int(s) for s in lengths)
    out = bytearray(write_varint(len(syms)))
    for i, s in enumerate(syms):
        out += write_varint(_zigzag(s) if i == 0 else s - syms[i - 1] - 1)
    out += bytes(int(lengths[s]) for s in syms)
    return bytes(out)


def unpack_table(data: bytes, pos: int = 0) -> Tuple[Dict[int, int], int]:
    """Inverse of :func:`pack_table`; returns ``(lengths, new pos)``."""
    k, pos = read_varint(data, pos)
    syms = []
    for i in range(k):
        u, pos = read_varint(data, pos)
        syms.append(_unzigzag(u) if i == 0 else syms[-1] + u + 1)
    if pos + k > len(data):
        raise ValueError("truncated code table.")
    lengths = {s: int(data[pos + i]) for i, s in enumerate(syms)}
    return lengths, pos + k


# ----------------------------------------------------------------------------- wrapper
@dataclass(frozen=True)
class HuffmanCode:
    """A canonical Huffman code for one alphabet: ``lengths`` is ``{symbol: bits}``."""

    lengths: Dict[int, int]

    @classmethod
    def from_frequencies(cls, freqs: Mapping[int, int]) -> "HuffmanCode":
        return cls(dict(sorted(code_lengths(freqs).items())))

    @classmethod
    def from_data(cls, x) -> "HuffmanCode":
        x = _check_symbols(x)
        syms, counts = np.unique(x, return_counts=True)
        return cls.from_frequencies(dict(zip(syms.tolist(), counts.tolist())))

    @property
    def codes(self) -> Dict[int, Tuple[int, int]]:
        return canonical_codes(self.lengths) if self.lengths else {}

    def encode(self, x) -> Tuple[bytes, int]:
        return encode(x, self.codes)

    def decode(self, data: bytes, count: int) -> np.ndarray:
        return decode(data, count, self.lengths)

    def table_bytes(self) -> bytes:
        return pack_table(self.lengths)

    def coded_bits(self, x) -> int:
        """``Σ_s count(s) · length(s)`` for the stream ``x``."""
        x = _check_symbols(x)
        syms, counts = np.unique(x, return_counts=True)
        return int(sum(c * self.lengths[s] for s, c in zip(syms.tolist(), counts.tolist())))


def encode_stream(x) -> Tuple[bytes, bytes, int]:
    """Build the Huffman code of ``x`` and encode it: ``(table bytes, payload, payload bits)``."""
    code = HuffmanCode.from_data(x)
    payload, nbits = code.encode(x)
    return code.table_bytes(), payload, nbits


def decode_stream(table: bytes, payload: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`encode_stream` (``count`` symbols)."""
    lengths, end = unpack_table(table)
    if end != len(table):
        raise ValueError(f"code table has {len(table) - end} trailing bytes.")
    return decode(payload, count, lengths)
