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
