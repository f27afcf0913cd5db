"""Compression: partial-L2 pruning → learnable-MSQE quantization → canonical Huffman coding.

Choi, El-Khamy & Lee's pipeline (methods.md §3), end to end:

1. train with the learnable partial-L2 term at a target fraction ``r`` (small weights shrink),
2. prune the ``r`` smallest ``|w|`` of every kernel; the mask is fixed and pruned weights stay
   exactly zero from then on (:class:`PruningMask`),
3. fine-tune with the learnable-coefficient MSQE at ``b`` bits until the weights sit on the grid,
   then snap them to it with the learned steps δ,
4. entropy-code the integer grid indices with canonical Huffman codes, the zeros sparsely
   (non-zero values + a Huffman-coded gap stream, or dense if that is smaller, per kernel),
5. write a ``.tfqz`` file (versioned, CRC-checked) that decodes to a bit-identical model.

Modules: :mod:`~tfqreg.compression.huffman` (the coder), :mod:`~tfqreg.compression.codec`
(dense / sparse tensor coding), :mod:`~tfqreg.compression.fileformat` (``.tfqz``,
``save_compressed`` / ``load_compressed``), :mod:`~tfqreg.compression.report` (the byte
accounting), :mod:`~tfqreg.compression.pipeline` (training stages, :class:`Compressor`).

>>> from tfqreg import compression, models
>>> model = models.tiny_cnn()
>>> steps = compression.quantize_weights(model, bits=4)
>>> compressed = compression.encode_model(model, bits=4, steps=steps)
>>> compressed.report.ratio > 4
True

Command line: ``tfqreg compress MODEL --prune 0.8 --bits 4 --data fashion_mnist --out DIR``.
"""

from tfqreg.compression import codec, huffman  # noqa: F401
from tfqreg.compression.cli import add_arguments, run_cli  # noqa: F401
from tfqreg.compression.fileformat import (  # noqa: F401
    CompressedModel,
    TfqzError,
    coded_kernels,
    decode_model,
    encode_model,
    inspect_compressed,
    load_compressed,
    quantize_weights,
    save_compressed,
)
from tfqreg.compression.pipeline import (  # noqa: F401
    CompressionResult,
    Compressor,
    compress,
    learned_steps,
)
from tfqreg.compression.pruning import PruningMask, apply_masks, prune_masks  # noqa: F401
from tfqreg.compression.report import ACCOUNTING, CompressionReport, LayerReport  # noqa: F401

__all__ = [
    "ACCOUNTING",
    "CompressedModel",
    "CompressionReport",
    "CompressionResult",
    "Compressor",
    "PruningMask",
    "apply_masks",
    "compress",
    "learned_steps",
    "prune_masks",
    "LayerReport",
    "TfqzError",
    "add_arguments",
    "coded_kernels",
    "codec",
    "decode_model",
    "encode_model",
    "huffman",
    "inspect_compressed",
    "load_compressed",
    "quantize_weights",
    "run_cli",
    "save_compressed",
]
