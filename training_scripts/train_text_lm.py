#!/usr/bin/env python
"""Pre-train a small causal language model on story captions (the LLM of a small StoryGPT-V).

StoryGPT-V's stage 2 reads stories with a frozen causal LM (OPT-6.7B in the paper). This script trains a
*small* LM on the captions of a story dataset, so that a compact StoryGPT-V can be built without a
multi-billion-parameter LLM (e.g. for SynthSV or for tests):

1. a byte-pair-encoding tokenizer is trained on the dataset's captions (original and referential), unless
   ``--tokenizer_name_or_path`` (or ``--pretrained_model_name_or_path``) gives one;
2. a small ``OPTConfig`` (or ``--model_type gpt2|llama``, or a ``--model_config`` JSON) is built, unless
   ``--pretrained_model_name_or_path`` names a causal LM to continue training;
3. the LM is trained on whole stories: the referential captions of a story joined into one text, so that it
   learns that "She" in frame 3 refers to a character named earlier.

The output folder loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` and
is what ``train_storygptv.py --language_model_name_or_path`` expects.

Example::

    accelerate launch training_scripts/train_text_lm.py \
        --dataset synthsv --output_dir out/synthsv-lm \
        --train_batch_size 64 --learning_rate 5e-4 --max_train_steps 5000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storygptv import training_utils as tu

logger = logging.getLogger("train_text_lm")

MODEL_TYPES = ("opt", "gpt2", "llama")

# Model card of an LLM-only folder (training_utils' templates describe diffusers pipelines).
TEXT_LM_CARD = """---
{{ card_data }}
---

# {{ model_name }}

A small causal language model trained from captions of story-visualisation data with the
[`storygptv`](https://github.com/storygptv/storygptv) library. It is meant as the (frozen) LLM of a compact
StoryGPT-V ([arXiv 2312.02252](https://arxiv.org/abs/2312.02252)): whole stories were used as training
texts, so the model sees pronouns ("She", "They") refer to characters named in earlier captions.

- **Base model:** {{ base_model }}
- **Training data:** {{ dataset }}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}")
```

Stage 2 of StoryGPT-V: `python training_scripts/train_storygptv.py --language_model_name_or_path {{ repo_id }} ...`

## Training

{{ hyperparameters }}

## Limitations

Trained only on {{ dataset }} captions: a toy-scale LM for that domain, not a general-purpose one.
"""


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tu.training_arg_parser(
        __doc__,
        allow_abbrev=False,
        learning_rate=5e-4,
        train_batch_size=32,
        max_train_steps=2000,
        lr_scheduler="cosine",
        lr_warmup_steps=100,
        checkpointing_steps=500,
        output_dir="outputs/text-lm",
    )
    g = parser.add_argument_group("data")
    g.add_argument("--frames_per_story", type=int, default=4, help="Frames (captions) per training story.")
    g.add_argument(
        "--include_original_captions",
        action="store_true",
        help="Also train on each story with its original (named) captions, besides the referential one.",
    )
    g.add_argument("--caption_separator", default=" ", help="Text between the captions of a story.")
    g.add_argument(
        "--max_length", type=int, default=512, help="Training sequences are cut to this many tokens."
    )
    g = parser.add_argument_group("model and tokenizer")
    g.add_argument(
        "--tokenizer_name_or_path",
        default=None,
        help="Use this tokenizer instead of training a BPE tokenizer on the captions (default: the model's own "
        "tokenizer when --pretrained_model_name_or_path is given).",
    )
    g.add_argument("--vocab_size", type=int, default=8000, help="Size of the trained BPE vocabulary.")
    g.add_argument("--model_type", choices=MODEL_TYPES, default="opt", help="Architecture of a new LM.")
    g.add_argument(
        "--model_config",
        default=None,
        help="JSON file (or inline JSON object) of config fields for a new LM, merged over the defaults.",
    )
    g.add_argument("--hidden_size", type=int, default=128)
    g.add_argument("--num_layers", type=int, default=4)
    g.add_argument("--num_heads", type=int, default=4)
    g.add_argument("--ffn_dim", type=int, default=None, help="Feed-forward width (default 4 x hidden).")
    g.add_argument(
        "--max_position_embeddings",
        type=int,
        default=1024,
        help="Context of a new LM; stage-2 story contexts need about m + caption tokens + 4 tokens per frame.",
    )
    g.add_argument("--dropout", type=float, default=0.1, help="Dropout of a new LM.")
    g.add_argument(
        "--lora_rank",
        type=int,
        default=0,
        help="Train LoRA adapters of this rank on a pretrained LM (merged into the saved weights); 0: full.",
    )
    args = parser.parse_args(argv)
    if args.max_length < 8:
        parser.error("--max_length must be at least 8.")
    if args.lora_rank and not args.pretrained_model_name_or_path:
        parser.error("--lora_rank needs --pretrained_model_name_or_path (a new LM trains all its weights).")
    if args.model_config:
        try:
            args.model_config_dict = _read_json(args.model_config)
        except (OSError, ValueError) as error:
            parser.error(
                f"--model_config {args.model_config!r} is neither a JSON file nor inline JSON: {error}"
            )
    else:
        args.model_config_dict = {}
    return args


def _read_json(value: str) -> dict[str, Any]:
    data = json.loads(Path(value).read_text() if os.path.isfile(value) else value)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------------- data
def story_texts(dataset: Any, include_original: bool, separator: str = " ") -> tuple[list[str], list[str]]:
    """``(training texts, tokenizer corpus)`` from story rows: one text per story (and caption variant)."""
    names = list(dataset.column_names)
    if "captions" not in names:
        raise tu.TrainingSetupError(
            f"The training data has no `captions` column (columns: {names}); the LM trains on captions."
        )
    columns = [c for c in ("captions", "referential_captions") if c in names]
    table = dataset.select_columns(columns)
    captions = table["captions"]
    referential = table["referential_captions"] if "referential_captions" in columns else captions
    texts: list[str] = []
    corpus: list[str] = []
    for named, refs in zip(captions, referential):
        named = [c.strip() for c in (named or []) if c and c.strip()]
        refs = [c.strip() for c in (refs or []) if c and c.strip()] or named
        if refs:
            texts.append(separator.join(refs))
        if include_original and named and named != refs:
            texts.append(separator.join(named))
        corpus.extend(named)
        corpus.extend(refs)
    if not texts:
        raise tu.TrainingSetupError("The training data holds no captions (every caption is empty).")
    return texts, corpus


def build_tokenizer(args: argparse.Namespace, corpus: list[str]) -> Any:
    """The tokenizer: ``--tokenizer_name_or_path`` / the pretrained model's, or a BPE trained on ``corpus``."""
    from transformers import AutoTokenizer

    source = args.tokenizer_name_or_path or args.pretrained_model_name_or_path
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        from storygptv.testing.tokenizers import build_bpe_tokenizer

        tokenizer = build_bpe_tokenizer(
            corpus,
            vocab_size=args.vocab_size,
            style="causal_lm",
            model_max_length=args.max_position_embeddings,
        )
    if tokenizer.eos_token is None:
        raise tu.TrainingSetupError(f"The tokenizer from {source!r} has no eos token; stories need one.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def new_model_config(args: argparse.Namespace, tokenizer: Any) -> Any:
    """A small causal-LM config for ``tokenizer`` (``--model_type``, sizes, ``--model_config`` overrides)."""
    from transformers import AutoConfig

    overrides = dict(args.model_config_dict)
    model_type = overrides.pop("model_type", args.model_type)
    h, layers, heads = args.hidden_size, args.num_layers, args.num_heads
    ffn = args.ffn_dim or 4 * h
    special = {
        "bos_token_id": tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model_type == "opt":
        fields = {
            "hidden_size": h,
            "word_embed_proj_dim": h,
            "ffn_dim": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": args.max_position_embeddings,
            "dropout": args.dropout,
            "attention_dropout": 0.0,
        }
    elif model_type == "gpt2":
        fields = {
            "n_embd": h,
            "n_inner": ffn,
            "n_layer": layers,
            "n_head": heads,
            "n_positions": args.max_position_embeddings,
            "resid_pdrop": args.dropout,
            "embd_pdrop": args.dropout,
            "attn_pdrop": 0.0,
        }
    elif model_type == "llama":
        fields = {
            "hidden_size": h,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": args.max_position_embeddings,
            "tie_word_embeddings": True,
        }
    else:
        raise tu.TrainingSetupError(f"--model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
    vocab = int(math.ceil(len(tokenizer) / 8) * 8)
    return AutoConfig.for_model(model_type, vocab_size=vocab, **{**special, **fields, **overrides})


class CaptionLMCollator:
    """Tokenise story texts as ``BOS text EOS``, right-pad, and mask the padding in the labels."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def reseed(self, seed: int) -> None:  # no randomness (for training_utils.seeded_collate)
        pass

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return (bos + ids)[: self.max_length - 1] + [tok.eos_token_id]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(row["text"]) for row in rows]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def hyperparameters(args: argparse.Namespace, keys: list[str]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    """Train; returns the output folder (model + tokenizer + README.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    tu.setup_logging()
    output_dir = Path(args.output_dir)
    # Every check that can fail runs before the long work.
    tu.check_dataset_args(args)
    resume = tu.find_resume_checkpoint(args)
    stories = tu.load_train_stories(args, frames_per_story=args.frames_per_story, referential=True)
    texts, corpus = story_texts(stories, args.include_original_captions, args.caption_separator)

    accelerator = tu.make_accelerator(args)
    if resume is not None and (output_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(output_dir)  # the interrupted run's own tokenizer
    else:
        tokenizer = build_tokenizer(args, corpus)
    torch.manual_seed(args.seed)
    if args.pretrained_model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.pretrained_model_name_or_path)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    else:
        model = AutoModelForCausalLM.from_config(new_model_config(args, tokenizer))
    if args.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, bias="none")
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(output_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    logger.info(
        "%d story texts, vocabulary %d, %s trainable parameters",
        len(texts),
        len(tokenizer),
        f"{sum(p.numel() for p in trainable):,}",
    )

    sampler = tu.make_batch_sampler(len(texts), args, accelerator)
    optimizer = tu.make_optimizer(trainable, args)
    lr_scheduler = tu.make_lr_scheduler(args, optimizer, accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    global_step = tu.resume_training(accelerator, args, resume, sampler, log=logger.info)
    loader = tu.make_train_dataloader(
        [{"text": t} for t in texts], sampler, CaptionLMCollator(tokenizer, args.max_length), args
    )
    tu.init_trackers(accelerator, args, "storygptv-text-lm")

    progress = tu.progress_bar(accelerator, args, global_step)
    model.train()
    batches = iter(loader)
    step_times: list[float] = []
    while global_step < args.max_train_steps:
        started = time.perf_counter()
        losses = []
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            batch.pop("batch_index")
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                tu.optimizer_step(accelerator, loss, optimizer, trainable, args.max_grad_norm, lr_scheduler)
            losses.append(loss.detach())
        global_step += 1
        step_times.append(time.perf_counter() - started)
        loss_value = float(accelerator.gather(torch.stack(losses).mean()).mean())
        logs = {
            "loss": loss_value,
            "ppl": float(np.exp(min(loss_value, 20.0))),
            "lr": lr_scheduler.get_last_lr()[0],
        }
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}")
        if global_step % args.logging_steps == 0:
            accelerator.log(logs, step=global_step)
        tu.end_of_step_checkpoint(accelerator, args, global_step, at_end=True)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if args.lora_rank > 0:
            final = final.merge_and_unload()
        final.config.use_cache = True
        final.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        tu.scrub_local_paths(output_dir)
        write_text_lm_card(args, output_dir, final)
        summary = {
            "global_step": global_step,
            "mean_step_time_s": float(np.mean(step_times)) if step_times else None,
            "num_texts": len(texts),
        }
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if args.push_to_hub:
            repo_id = args.hub_model_id or output_dir.name
            url = tu.push_folder_to_hub(output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            logger.info("Pushed to %s", url)
    accelerator.end_training()
    return output_dir


def write_text_lm_card(args: argparse.Namespace, folder: Path, model: Any) -> None:
    """README.md of the LM folder (``library_name: transformers``, ``pipeline_tag: text-generation``)."""
    import re

    from huggingface_hub import ModelCard, ModelCardData

    base = args.pretrained_model_name_or_path
    hub_base = base if base and not Path(base).exists() and re.match(r"^[\w.-]+/[\w.-]+$", base) else None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["storygptv", "story-visualization", "text-generation"],
        base_model=hub_base,
    )
    hp = hyperparameters(
        args,
        [
            "model_type",
            "hidden_size",
            "num_layers",
            "num_heads",
            "vocab_size",
            "max_length",
            "train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "lr_scheduler",
            "lr_warmup_steps",
            "max_train_steps",
            "mixed_precision",
            "seed",
            "lora_rank",
        ],
    )
    hp["parameters"] = f"{sum(p.numel() for p in model.parameters()):,}"
    table = "| option | value |\n|---|---|\n" + "\n".join(f"| `{k}` | {v} |" for k, v in hp.items())
    repo_id = args.hub_model_id or folder.name
    card = ModelCard.from_template(
        data,
        template_str=TEXT_LM_CARD,
        model_name=repo_id,
        repo_id=repo_id,
        base_model=base or "(trained from scratch)",
        dataset=args.train_dataset_path and "custom stories" or args.dataset,
        hyperparameters=table,
    )
    card.save(str(folder / "README.md"))


if __name__ == "__main__":
    main()
