"""Small byte-pair-encoding tokenizers trained offline, deterministically, with the `tokenizers` library.

:func:`build_bpe_tokenizer` trains a real BPE on a list of sentences and wraps it as a transformers fast
tokenizer. The training scripts build the tokenizers of small models with it (``train_text_lm.py`` for a
story LLM, ``make_small_pipeline.py`` for the CLIP-style text encoder of the small SynthSV Char-LDM); the
tests build their tiny tokenizers with it too (``storygptv.testing`` re-exports it). Rarer words split into
several sub-tokens, which is what the name-position logic of :mod:`storygptv.characters` must cope with.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["DEFAULT_CORPUS", "build_bpe_tokenizer"]

# Words of the referential benchmarks and of SynthSV. Names appear in several cases and with
# punctuation so that they tokenise into word pieces; rarer ones ("Barney", "Slate") stay split.
DEFAULT_CORPUS: tuple[str, ...] = (
    "Fred and Wilma are in the kitchen. They talk.",
    "Fred and Barney are in the yard. They start to argue!",
    "Barney, Betty and Fred are laughing in the living room.",
    "Mr Slate talks to Fred's wife Wilma; she smiles?",
    "Bamm Bamm and Pebbles are playing with Dino (the dog).",
    "Pororo, Loopy and Crong are walking in the snow. Eddy and Poby watch.",
    "Petty, Tongtong, Rody and Harry sing a song.",
    "Ava is standing in the forest. She is waving.",
    "Bo and Cleo are talking on the beach. They are laughing.",
    "Dax, Eli and Fay are jumping in the desert. Gus is sitting by the lake.",
    "Hana is standing in the cave at night. He is in the snow.",
    "A man and a woman are sitting at a table. It is a dog and a cat - 1 2 3 4 5 6 7 8 9 0.",
)


def build_bpe_tokenizer(
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 160,
    style: str = "clip",
    model_max_length: int = 77,
    extra_special_tokens: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer on ``corpus`` and wrap it as a transformers fast tokenizer.

    Args:
        corpus: the training sentences (a fixed corpus gives a deterministic vocabulary).
        vocab_size: the target vocabulary size including special tokens; small values force sub-word
            splits.
        style: ``"clip"`` lower-cases, marks word ends with ``</w>`` and wraps every sequence in
            ``<|startoftext|> ... <|endoftext|>`` with ``<|endoftext|>`` as padding (like the CLIP
            tokenizer of Stable Diffusion). ``"causal_lm"`` keeps case, prepends ``<s>`` only and pads
            with ``<pad>`` (like OPT / Llama tokenizers).
        model_max_length: the tokenizer's ``model_max_length``.
        extra_special_tokens: added as special tokens after training (e.g. ``"<|image|>"``).
    """
    corpus = list(corpus)
    if style == "clip":
        bos, eos, pad, unk = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|unk|>"
        specials = [bos, eos, unk]
        suffix = "</w>"
    elif style == "causal_lm":
        bos, eos, pad, unk = "<s>", "</s>", "<pad>", "<unk>"
        specials = [bos, eos, pad, unk]
        suffix = "</w>"
    else:
        raise ValueError(f"`style` must be 'clip' or 'causal_lm', got {style!r}.")

    alphabet = sorted(set("".join(corpus)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-"))
    if style == "clip":
        alphabet = sorted({c.lower() for c in alphabet})
    normalizer = normalizers.Sequence(
        [normalizers.NFC()] + ([normalizers.Lowercase()] if style == "clip" else [])
    )
    pre_tokenizer = pre_tokenizers.Whitespace()
    vocab, merges = _train_bpe(corpus, alphabet, specials, vocab_size, suffix, normalizer, pre_tokenizer)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, end_of_word_suffix=suffix))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    bos_id, eos_id = tokenizer.token_to_id(bos), tokenizer.token_to_id(eos)
    if style == "clip":
        template = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, bos_id), (eos, eos_id)],
        )
    else:
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    tokenizer.post_processor = template
    tokenizer.decoder = decoders.BPEDecoder(suffix=suffix)

    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length, **special
    )
    extra = list(extra_special_tokens)
    if extra:
        wrapped.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    return wrapped


def _train_bpe(
    corpus: list[str],
    alphabet: list[str],
    specials: list[str],
    vocab_size: int,
    suffix: str,
    normalizer: normalizers.Normalizer,
    pre_tokenizer: pre_tokenizers.PreTokenizer,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-pair encoding learnt in Python so that the result is deterministic.

    The `tokenizers` trainer breaks ties between equally frequent pairs in hash-map order, which changes
    from process to process; here ties go to the lexicographically smallest pair. The corpora are small
    (a few dozen distinct words), so this costs milliseconds.
    """
    counts: Counter[str] = Counter()
    for text in corpus:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] += 1
    words = {word: [*word[:-1], word[-1] + suffix] for word in counts}
    tokens = list(specials) + alphabet + [c + suffix for c in alphabet]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    while len(tokens) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        for word, symbols in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[word] = out
    return {token: index for index, token in enumerate(tokens)}, merges
