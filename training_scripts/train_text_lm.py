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

Your own stories: ``--dataset folder --data_dir DIR`` (README, "Fine-tune on your own stories"); the BPE tokenizer is then trained on
your captions, so the LM learns your characters' names.

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
from pathlib import Path
from typing import Any

import torch

from storygptv.tokenization import build_bpe_tokenizer
from storygptv.training.accelerate_setup import init_trackers, make_accelerator, setup_logging
from storygptv.training.arguments import frames_per_story_default, run_settings, training_arg_parser
from storygptv.training.checkpoints import save_checkpoint
from storygptv.training.checks import TrainingSetupError, check_dataset
from storygptv.training.data import (
    ResumableBatchSampler,
    load_train_stories,
    make_train_dataloader,
    next_batch,
)
from storygptv.training.hub import hub_repo_id, push_folder_to_hub, scrub_local_paths
from storygptv.training.loop import (
    StepLogger,
    finish_training,
    make_lr_scheduler,
    make_optimizer,
    optimizer_step,
    perplexity,
    seed_micro_step,
)
from storygptv.training.model_cards import card_dataset_name, write_model_card
from storygptv.training.resume import find_resume_checkpoint, resume_training

logger = logging.getLogger("train_text_lm")

MODEL_TYPES = ("opt", "gpt2", "llama")


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_arg_parser(
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
    g.add_argument(
        "--frames_per_story",
        type=int,
        default=None,
        help="Frames (captions) per training story (default: 4; whole stories for --dataset folder).",
    )
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
    args.frames_per_story = frames_per_story_default(args.dataset, args.frames_per_story)
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
        raise TrainingSetupError(
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
        raise TrainingSetupError("The training data holds no captions (every caption is empty).")
    return texts, corpus


def build_tokenizer(args: argparse.Namespace, corpus: list[str]) -> Any:
    """The tokenizer: ``--tokenizer_name_or_path`` / the pretrained model's, or a BPE trained on ``corpus``."""
    from transformers import AutoTokenizer

    source = args.tokenizer_name_or_path or args.pretrained_model_name_or_path
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        tokenizer = build_bpe_tokenizer(
            corpus,
            vocab_size=args.vocab_size,
            style="causal_lm",
            model_max_length=args.max_position_embeddings,
        )
    if tokenizer.eos_token is None:
        raise TrainingSetupError(f"The tokenizer from {source!r} has no eos token; stories need one.")
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
        raise TrainingSetupError(f"--model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
    vocab = int(math.ceil(len(tokenizer) / 8) * 8)
    return AutoConfig.for_model(model_type, vocab_size=vocab, **{**special, **fields, **overrides})


class CaptionLMCollator:
    """Tokenise story texts as ``BOS text EOS``, right-pad, and mask the padding in the labels."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def reseed(self, seed: int) -> None:
        """No randomness to reseed (the training loader reseeds every collator before each batch)."""

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


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    """Train; returns the output folder (model + tokenizer + README.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    setup_logging()
    output_dir = Path(args.output_dir)
    # Every check that can fail runs before the long work.
    check_dataset(args.dataset, args.data_dir, args.train_dataset_path)
    settings = run_settings(args)
    resume = find_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        settings,
        overwrite=args.overwrite_output_dir,
        allow_changed_settings=args.allow_changed_settings,
    )
    stories = load_train_stories(
        args.dataset,
        data_dir=args.data_dir,
        seed=args.seed,
        num_stories=args.num_stories,
        train_dataset_path=args.train_dataset_path,
        frames_per_story=args.frames_per_story,
        referential=True,
        **args.dataset_options,
    )
    texts, corpus = story_texts(stories, args.include_original_captions, args.caption_separator)

    accelerator = make_accelerator(
        args.output_dir,
        logging_dir=args.logging_dir,
        report_to=args.report_to,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        train_batch_size=args.train_batch_size,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
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

    sampler = ResumableBatchSampler(
        len(texts), args.train_batch_size, seed=args.seed, num_replicas=world, rank=rank
    )
    optimizer = make_optimizer(
        trainable,
        learning_rate=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        device=accelerator.device,
    )
    lr_scheduler = make_lr_scheduler(
        args.lr_scheduler,
        optimizer,
        total_steps=args.max_train_steps,
        warmup_steps=args.lr_warmup_steps,
        num_processes=world,
        step_size=args.lr_step_size,
        step_gamma=args.lr_step_gamma,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    global_step = resume_training(
        accelerator,
        resume,
        sampler,
        output_dir=args.output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        overwrite=args.overwrite_output_dir,
        log=logger.info,
    )
    loader = make_train_dataloader(
        [{"text": t} for t in texts],
        sampler,
        CaptionLMCollator(tokenizer, args.max_length),
        seed=args.seed,
        num_workers=args.dataloader_num_workers,
    )
    init_trackers(accelerator, args.tracker_project_name or "storygptv-text-lm", vars(args))

    # The loop of every training script (storygptv.training.loop).
    steps = StepLogger(
        accelerator,
        args.max_train_steps,
        initial_step=global_step,
        accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
        derived=perplexity,
    )
    model.train()
    data_iter = iter(loader)
    micro = sampler.start_batch
    while global_step < args.max_train_steps:
        batch = next_batch(data_iter, micro)
        seed_micro_step(args.seed, "dropout", micro, rank)  # dropout of the LM
        with accelerator.accumulate(model):
            loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
            optimizer_step(accelerator, loss, optimizer, lr_scheduler, trainable, args.max_grad_norm)
        steps.add(loss=loss)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        # One optimizer step done.
        global_step += 1
        steps.end_step(global_step, lr_scheduler.get_last_lr()[0])
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(
                accelerator, args.output_dir, global_step, settings, total_limit=args.checkpoints_total_limit
            )
        if global_step == args.debug_interrupt_at_step:
            raise KeyboardInterrupt(f"--debug_interrupt_at_step {global_step}")
    steps.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if args.lora_rank > 0:
            final = final.merge_and_unload()
        final.config.use_cache = True
        final.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        scrub_local_paths(output_dir)
        write_text_lm_card(args, output_dir, final)
        summary = {
            "global_step": global_step,
            "mean_step_time_s": steps.mean_step_time,
            "num_texts": len(texts),
        }
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if args.push_to_hub:
            url = push_folder_to_hub(
                output_dir,
                hub_repo_id(args.hub_model_id, output_dir),
                token=args.hub_token,
                private=args.hub_private or None,
            )
            logger.info("Pushed to %s", url)
    finish_training(accelerator, args.output_dir, steps)
    return output_dir


def write_text_lm_card(args: argparse.Namespace, folder: Path, model: Any) -> None:
    """README.md of the LM folder (the ``text_lm`` template: transformers, text-generation)."""
    keys = (
        "model_type", "hidden_size", "num_layers", "num_heads", "vocab_size", "max_length", "train_batch_size",
        "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps",
        "mixed_precision", "seed", "lora_rank",
    )  # fmt: skip
    hyper = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    hyper["parameters"] = f"{sum(p.numel() for p in model.parameters()):,}"
    write_model_card(
        folder,
        "text_lm",
        repo_id=args.hub_model_id,
        base_model=args.pretrained_model_name_or_path,
        dataset=card_dataset_name(args.dataset, args.train_dataset_path, args.data_dir),
        hyperparameters=hyper,
        tags=["text-generation"],
    )


if __name__ == "__main__":
    main()
