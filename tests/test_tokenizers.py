import hashlib
import subprocess
import sys

from storygptv.testing import build_bpe_tokenizer

SNIPPET = (
    "import hashlib; from storygptv.testing.tokenizers import build_bpe_tokenizer as b; "
    "print(hashlib.md5(b().backend_tokenizer.to_str().encode()).hexdigest())"
)


def test_vocabulary_is_identical_across_processes():
    # The `tokenizers` BPE trainer breaks ties in hash-map order; ours must not depend on the process.
    here = hashlib.md5(build_bpe_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()
    other = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here


def test_subword_splits_and_specials():
    tok = build_bpe_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok("Tongtong waves.")["input_ids"])
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert len(tokens) > 5  # the rare name is split into several pieces
    assert tok.decode(tok("fred and barney.")["input_ids"], skip_special_tokens=True) == "fred and barney ."
    causal = build_bpe_tokenizer(style="causal_lm", extra_special_tokens=["<|image|>"])
    ids = causal("Fred <|image|>")["input_ids"]
    assert ids[0] == causal.bos_token_id and ids[-1] == causal.convert_tokens_to_ids("<|image|>")


def test_production_home_of_the_builder():
    """Training scripts import the builder from ``storygptv.tokenization``; ``testing`` only re-exports it."""
    from storygptv import tokenization
    from storygptv.testing import tokenizers

    assert tokenizers.build_bpe_tokenizer is tokenization.build_bpe_tokenizer
    assert tokenizers.DEFAULT_CORPUS is tokenization.DEFAULT_CORPUS
    tok = tokenization.build_bpe_tokenizer(["Ava waves at Bo.", "Bo waves back."], vocab_size=300)
    assert tok.convert_ids_to_tokens(tok("Bo waves")["input_ids"])[1:-1] == ["bo</w>", "waves</w>"]
