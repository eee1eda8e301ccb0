"""Small tokenizers built fully offline with the `tokenizers` library.

They are real byte-pair-encoding tokenizers (trained on a fixed corpus, so deterministic) and split
rarer words into several sub-tokens, which is what the name-position logic must cope with.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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
    tokenizer = Tokenizer(models.BPE(unk_token=unk, end_of_word_suffix=suffix))
    norm = [normalizers.NFC()] + ([normalizers.Lowercase()] if style == "clip" else [])
    tokenizer.normalizer = normalizers.Sequence(norm)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        end_of_word_suffix=suffix,
        show_progress=False,
    )
    # Every character also as a word of its own, so that punctuation gets its "x</w>" token.
    tokenizer.train_from_iterator(corpus + [" ".join(alphabet)], trainer)
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

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=model_max_length,
    )
    extra = list(extra_special_tokens)
    if extra:
        wrapped.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    return wrapped
