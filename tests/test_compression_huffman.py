"""Canonical Huffman coder and the dense/sparse tensor codec, against independent oracles:
a textbook heapq Huffman tree, string-built bit streams, Kraft's equality, Shannon entropy."""

import heapq
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from tfqreg.compression import codec, huffman


# ----------------------------------------------------------------------------- oracles
def textbook_lengths(freqs):
    """Huffman's algorithm with a heap of trees; lengths = depths of the leaves."""
    if len(freqs) == 1:
        return {next(iter(freqs)): 0}
    counter = itertools.count()
    heap = [(f, next(counter), {s: 0}) for s, f in freqs.items()]
    heapq.heapify(heap)
    while len(heap) > 1:
        fa, _, a = heapq.heappop(heap)
        fb, _, b = heapq.heappop(heap)
        merged = {s: d + 1 for s, d in itertools.chain(a.items(), b.items())}
        heapq.heappush(heap, (fa + fb, next(counter), merged))
    return heap[0][2]


def cost(freqs, lengths):
    return sum(freqs[s] * lengths[s] for s in freqs)


def random_freqs(rng, k):
    kind = rng.integers(3)
    if kind == 0:
        f = rng.integers(1, 1000, size=k)
    elif kind == 1:
        f = rng.integers(1, 4, size=k)  # many ties
    else:
        f = np.floor(1000 * rng.pareto(1.0, size=k)).astype(int) + 1  # very skewed
    syms = rng.choice(np.arange(-500, 500), size=k, replace=False)
    return {int(s): int(c) for s, c in zip(syms, f)}


# ----------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("k", [2, 3, 5, 16, 40, 120])
def test_code_lengths_are_optimal_like_textbook_huffman(k):
    rng = np.random.default_rng(k)
    for _ in range(20):
        freqs = random_freqs(rng, k)
        mine = huffman.code_lengths(freqs)
        ref = textbook_lengths(freqs)
        assert set(mine) == set(freqs)
        assert cost(freqs, mine) == cost(freqs, ref)  # both optimal: same total bits
        assert sum(Fraction(1, 2 ** l) for l in mine.values()) == 1  # Kraft equality
        # more frequent symbols never get longer codes
        for a, b in itertools.combinations(freqs, 2):
            if freqs[a] > freqs[b]:
                assert mine[a] <= mine[b]


def test_code_lengths_small_known_cases():
    assert huffman.code_lengths({}) == {}
    assert huffman.code_lengths({7: 5}) == {7: 0}
    assert huffman.code_lengths({1: 5, 2: 1}) == {1: 1, 2: 1}
    assert huffman.code_lengths({0: 0, 3: 4}) == {3: 0}  # zero counts are dropped
    # dyadic probabilities: lengths are exactly -log2 p
    assert huffman.code_lengths({0: 8, 1: 4, 2: 2, 3: 1, 4: 1}) == {0: 1, 1: 2, 2: 3, 3: 4, 4: 4}
    # Fibonacci weights give the deepest tree: lengths 1..k-1 (and k-1 twice)
    fib = [1, 1]
    while len(fib) < 12:
        fib.append(fib[-1] + fib[-2])
    lengths = huffman.code_lengths(dict(enumerate(fib)))
    assert sorted(lengths.values()) == sorted(list(range(1, 12)) + [11])


def test_canonical_codes_rfc1951_example():
    # RFC 1951 §3.2.2: lengths (A,B,C,D) = (2,1,3,3) -> B=0, A=10, C=110, D=111
    codes = huffman.canonical_codes({ord("A"): 2, ord("B"): 1, ord("C"): 3, ord("D"): 3})
    as_str = {chr(s): format(c, f"0{l}b") for s, (c, l) in codes.items()}
    assert as_str == {"A": "10", "B": "0", "C": "110", "D": "111"}


def test_canonical_codes_are_prefix_free_and_reject_bad_lengths():
    rng = np.random.default_rng(1)
    freqs = random_freqs(rng, 30)
    codes = huffman.canonical_codes(huffman.code_lengths(freqs))
    words = [format(c, f"0{l}b") for c, l in codes.values()]
    for a, b in itertools.permutations(words, 2):
        assert not b.startswith(a)
    with pytest.raises(ValueError, match="Kraft"):
        huffman.canonical_codes({0: 1, 1: 1, 2: 1})


# ----------------------------------------------------------------------------- bits
def string_encode(x, codes):
    bits = "".join(format(codes[s][0], f"0{codes[s][1]}b") if codes[s][1] else "" for s in x)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


@pytest.mark.parametrize("case", ["empty", "one", "two", "uniform", "skewed", "negative",
                                  "long_codes"])
def test_encode_decode_round_trip(case):
    rng = np.random.default_rng(3)
    x = {
        "empty": np.zeros(0, dtype=int),
        "one": np.full(37, -3),
        "two": rng.choice([4, 9], size=101, p=[0.9, 0.1]),
        "uniform": rng.integers(-8, 8, size=5000),
        "skewed": np.round(rng.laplace(0, 1.5, size=5000)).astype(int),
        "negative": rng.integers(-70000, -69990, size=300),
        # Fibonacci counts: max code length 19 > 16, exercises the bit-by-bit decoder
        "long_codes": np.repeat(np.arange(20), [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144,
                                                233, 377, 610, 987, 1597, 2584, 4181, 6765]),
    }[case]
    rng.shuffle(x)
    code = huffman.HuffmanCode.from_data(x)
    payload, nbits = code.encode(x)
    syms, counts = np.unique(x, return_counts=True)
    assert nbits == sum(c * code.lengths[s] for s, c in zip(syms.tolist(), counts.tolist()))
    assert nbits == code.coded_bits(x)
    assert len(payload) == math.ceil(nbits / 8)
    if x.size:
        assert payload == string_encode(x.tolist(), code.codes)
    if case == "long_codes":
        assert max(code.lengths.values()) > 16
    np.testing.assert_array_equal(code.decode(payload, x.size), x)
    table, payload2, _ = huffman.encode_stream(x)
    assert payload2 == payload
    np.testing.assert_array_equal(huffman.decode_stream(table, payload2, x.size), x)


def test_one_symbol_costs_no_payload_and_two_symbols_one_bit_each():
    table, payload, nbits = huffman.encode_stream(np.full(1000, 5))
    assert nbits == 0 and payload == b""
    assert huffman.unpack_table(table)[0] == {5: 0}
    _, payload, nbits = huffman.encode_stream(np.array([1, 2] * 50))
    assert nbits == 100 and len(payload) == 13


@pytest.mark.parametrize("seed", range(5))
def test_average_length_within_entropy_bound(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 40))
    p = rng.dirichlet(np.full(k, 0.3))
    x = rng.choice(k, size=20000, p=p)
    code = huffman.HuffmanCode.from_data(x)
    avg = code.coded_bits(x) / x.size
    _, counts = np.unique(x, return_counts=True)
    q = counts / x.size
    h = float(-(q * np.log2(q)).sum())
    assert math.isclose(huffman.entropy_bits(x), h * x.size, rel_tol=1e-12)
    assert h <= avg + 1e-12 < h + 1


def test_table_round_trip_and_varints():
    lengths = {-300: 3, -2: 2, 0: 1, 5: 4, 70000: 4}
    data = huffman.pack_table(lengths)
    assert huffman.unpack_table(data) == (lengths, len(data))
    for v in (0, 1, 127, 128, 300, 2 ** 40):
        b = huffman.write_varint(v)
        assert huffman.read_varint(b, 0) == (v, len(b))
    assert len(huffman.write_varint(127)) == 1 and len(huffman.write_varint(128)) == 2


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="symbols"):
        huffman.HuffmanCode.from_data(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="freqs"):
        huffman.code_lengths({0: -1, 1: 2})
    code = huffman.HuffmanCode.from_data(np.array([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="not in the code table"):
        code.encode(np.array([3]))
    payload, _ = code.encode(np.array([0, 1, 2, 2] * 10))
    with pytest.raises(ValueError, match="ended"):
        code.decode(payload[:2], 40)
    with pytest.raises(ValueError, match="trailing"):
        huffman.decode_stream(code.table_bytes() + b"\x00", payload, 40)


# ----------------------------------------------------------------------------- codec
def test_gaps_and_positions_are_inverse():
    mask = np.array([0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0], dtype=bool)
    gaps = codec.gaps_from_mask(mask)
    assert gaps.tolist() == [1, 0, 3, 1]
    assert codec.positions_from_gaps(gaps).tolist() == np.flatnonzero(mask).tolist()


@pytest.mark.parametrize("density", [0.0, 0.02, 0.2, 0.6, 1.0])
@pytest.mark.parametrize("mode", ["sparse", "dense", "auto"])
def test_codec_round_trip(density, mode):
    rng = np.random.default_rng(int(density * 100))
    q = rng.integers(-8, 8, size=(30, 40)) * (rng.random((30, 40)) < density)
    enc = codec.encode(q, mode)
    np.testing.assert_array_equal(codec.decode(enc).reshape(q.shape), q)
    assert enc.nnz == np.count_nonzero(q) and enc.size == q.size
    assert enc.index_entropy_bits == pytest.approx(huffman.entropy_bits(q))
    if mode == "auto":
        other = codec.encode(q, "dense" if enc.mode == "sparse" else "sparse")
        assert enc.total_bytes <= other.total_bytes
        assert enc.other_mode_bytes == other.total_bytes


def test_sparse_wins_at_high_sparsity_and_codes_the_mask_near_its_entropy():
    rng = np.random.default_rng(0)
    n, p = 200_000, 0.2
    q = rng.integers(1, 8, size=n) * rng.choice([-1, 1], size=n) * (rng.random(n) < p)
    enc = codec.encode(q)
    assert enc.mode == "sparse"
    assert enc.other_mode_bytes > 1.1 * enc.total_bytes
    # i.i.d. Bernoulli(p) mask: its information is n·H2(p) bits; the gap code gets close
    h2 = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    assert enc.position_bits == pytest.approx(n * h2, rel=0.05)
    assert enc.position_bits >= enc.position_entropy_bits
    assert enc.value_bits >= enc.value_entropy_bits
    assert (enc.position_bits + enc.value_bits) / enc.stream_entropy_bits < 1.05
