"""The offline BPE tokenizer builder, re-exported for tests (its home is :mod:`storygptv.tokenization`).

``build_bpe_tokenizer()`` without arguments trains on :data:`DEFAULT_CORPUS`, the words of the referential
benchmarks and of SynthSV: the small deterministic vocabulary every test tokenizer of the package uses.
"""

from __future__ import annotations

from ..tokenization import DEFAULT_CORPUS, build_bpe_tokenizer

__all__ = ["DEFAULT_CORPUS", "build_bpe_tokenizer"]
