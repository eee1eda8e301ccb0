"""Build the randomly initialised small Char-LDM that the SynthSV default starts from.

Stage 1 (`train_char_ldm.py`) fine-tunes a Char-LDM pipeline folder. For real data that folder is built
from Stable Diffusion 1.5 and CLIP ViT-L/14; for the small embedded default there is nothing to start
from, so this script creates one from a size config (``configs/synthsv_small/pipeline.json``):

- a CLIP-style BPE tokenizer trained on SynthSV captions (original and referential),
- a small ``CLIPTextModel`` and ``CLIPVisionModelWithProjection`` (random),
- the VAE trained by ``train_vae.py`` (``--vae``), or a random one from ``--vae_config``,
- a small ``UNet2DConditionModel``, a ``CharacterFuser`` and the inference scheduler,
- ``characters/<Name>.png``: SynthSV's reference image of each character (the CLI uses them by default).

Usage:
    python training_scripts/make_small_pipeline.py --vae runs/vae --output_dir runs/char_ldm_init
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from storygptv import CharacterFuser, CharLDMPipeline
from storygptv.data.synthsv import reference_images, sample_story
from storygptv.tokenization import build_bpe_tokenizer
from storygptv.training.hub import scrub_local_paths
from storygptv.training.references import write_cast

HERE = Path(__file__).parent
DEFAULT_CONFIG = HERE / "configs" / "synthsv_small" / "pipeline.json"


def synthsv_corpus(num_stories: int = 2000, seed: int = 0) -> list[str]:
    """Original and referential captions of ``num_stories`` training stories."""
    corpus: list[str] = []
    for index in range(num_stories):
        story = sample_story(index, split="train", frames_per_story=4, seed=seed)
        corpus.extend(story.captions)
        corpus.extend(story.referential_captions)
    return corpus


def build(config: dict, vae: AutoencoderKL, seed: int = 0) -> CharLDMPipeline:
    tok_cfg = config["tokenizer"]
    tokenizer = build_bpe_tokenizer(
        synthsv_corpus(seed=seed),
        vocab_size=tok_cfg["vocab_size"],
        model_max_length=tok_cfg["model_max_length"],
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **config["text_encoder"],
        )
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**config["image_encoder"]))
    unet = UNet2DConditionModel(**config["unet"])
    fuser = CharacterFuser(**config["fuser"])
    scheduler_cfg = dict(config["scheduler"])
    scheduler_cls = getattr(diffusers, scheduler_cfg.pop("_class_name"))
    scheduler = scheduler_cls(**scheduler_cfg)
    size = config["feature_extractor"]["size"]
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return CharLDMPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        image_encoder=image_encoder,
        fuser=fuser,
        feature_extractor=feature_extractor,
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="size config (JSON)")
    parser.add_argument("--vae", default=None, help="a trained AutoencoderKL folder (train_vae.py output)")
    parser.add_argument("--vae_config", default=None, help="without --vae: a JSON config for a random VAE")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = json.loads(Path(args.config).read_text())
    if args.vae:
        if (
            not (Path(args.vae) / "config.json").is_file()
            and not (Path(args.vae) / "vae" / "config.json").is_file()
        ):
            raise SystemExit(f"error: --vae {args.vae!r} holds no AutoencoderKL (config.json) folder.")
        sub = "vae" if (Path(args.vae) / "vae" / "config.json").is_file() else None
        vae = AutoencoderKL.from_pretrained(args.vae, subfolder=sub)
    elif args.vae_config:
        torch.manual_seed(args.seed)
        vae = AutoencoderKL(**json.loads(Path(args.vae_config).read_text()))
    else:
        raise SystemExit("error: pass --vae (a trained VAE folder) or --vae_config (a random VAE).")

    pipe = build(config, vae, seed=args.seed)
    out = Path(args.output_dir)
    pipe.save_pretrained(out)
    scrub_local_paths(out)
    write_cast(out, reference_images(size=config["image_encoder"]["image_size"]))
    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in pipe.components.items()
        if hasattr(m, "parameters")
    }
    print(f"wrote {out}: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items()))
    return out


if __name__ == "__main__":
    main()
