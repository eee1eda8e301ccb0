#!/usr/bin/env bash
# Train the small SynthSV StoryGPT-V (the package's embedded default) on a CPU, end to end.
#
#   bash training_scripts/train_synthsv_default.sh [OUT_DIR]      (default OUT_DIR: runs/synthsv_default)
#
# Every stage resumes from its latest checkpoint (or is skipped when its output exists), so running the
# script again after an interruption continues where it stopped and never loses finished work.
# Step counts can be overridden through the environment, e.g. VAE_STEPS=1000 CHAR_LDM_STEPS=2000.
# The last stage prints the SynthSV quality table (benchmarks/synthsv_quality.py).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/synthsv_default}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
VAE_STEPS=${VAE_STEPS:-3000}
CHAR_LDM_STEPS=${CHAR_LDM_STEPS:-5500}
CHAR_LDM_DECAY_STEPS=${CHAR_LDM_DECAY_STEPS:-6000}
LM_STEPS=${LM_STEPS:-1500}
TARGET_STORIES=${TARGET_STORIES:-2000}
STAGE2_STEPS=${STAGE2_STEPS:-2000}
EVAL_STORIES=${EVAL_STORIES:-100}
CONFIGS=training_scripts/configs/synthsv_small
mkdir -p "$OUT"

echo "== 1/7 VAE (${VAE_STEPS} steps)"
python training_scripts/train_vae.py --dataset synthsv --vae_config "$CONFIGS/vae.json" --resolution 64 \
    --output_dir "$OUT/vae" --train_batch_size 32 --learning_rate 1e-3 --lr_warmup_steps 100 \
    --max_train_steps "$VAE_STEPS" --checkpointing_steps 250 --checkpoints_total_limit 3 \
    --recon_loss l1 --kl_weight 1e-6 --use_ema --seed 0 --resume_from_checkpoint latest

echo "== 2/7 random small Char-LDM around the VAE"
if [ ! -f "$OUT/char_ldm_init/model_index.json" ]; then
    python training_scripts/make_small_pipeline.py --vae "$OUT/vae" --output_dir "$OUT/char_ldm_init"
fi

echo "== 3/7 stage 1: Char-LDM (${CHAR_LDM_STEPS} steps at a constant LR, then ${CHAR_LDM_DECAY_STEPS} with cosine decay)"
python training_scripts/train_char_ldm.py --pretrained_model_name_or_path "$OUT/char_ldm_init" \
    --dataset synthsv --output_dir "$OUT/char_ldm" --resolution 64 --reference_size 64 \
    --attention_blocks down_blocks.1 up_blocks.0 --max_characters 3 \
    --train_batch_size 32 --learning_rate 5e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 200 \
    --snr_gamma 5 --use_ema --ema_decay 0.999 --max_train_steps "$CHAR_LDM_STEPS" \
    --checkpointing_steps 250 --checkpoints_total_limit 3 --seed 0 --resume_from_checkpoint latest
# The second phase starts from the first one's (EMA) weights with a fresh optimizer and decays the LR to 0:
# on SynthSV it lifts the stage-1 ceiling (benchmarks/README.md, "stage 1").
python training_scripts/train_char_ldm.py --pretrained_model_name_or_path "$OUT/char_ldm" \
    --dataset synthsv --output_dir "$OUT/char_ldm_decay" --resolution 64 --reference_size 64 \
    --attention_blocks down_blocks.1 up_blocks.0 --max_characters 3 \
    --train_batch_size 32 --learning_rate 3e-4 --lr_scheduler cosine --lr_warmup_steps 200 \
    --snr_gamma 5 --use_ema --ema_decay 0.999 --max_train_steps "$CHAR_LDM_DECAY_STEPS" \
    --checkpointing_steps 250 --checkpoints_total_limit 2 --seed 1 --resume_from_checkpoint latest

echo "== 4/7 the small LLM on SynthSV stories of 8 frames (${LM_STEPS} steps)"
python training_scripts/train_text_lm.py --dataset synthsv --output_dir "$OUT/lm" \
    --model_config "$CONFIGS/llm.json" --include_original_captions --frames_per_story 8 \
    --train_batch_size 32 --learning_rate 1e-3 --lr_warmup_steps 100 --max_train_steps "$LM_STEPS" \
    --checkpointing_steps 500 --seed 0 --resume_from_checkpoint latest

echo "== 5/7 stage-2 targets: ${TARGET_STORIES} stories of 8 frames, 200 held out"
python training_scripts/precompute_targets.py --pretrained_model_name_or_path "$OUT/char_ldm_decay" \
    --dataset synthsv --num_stories "$TARGET_STORIES" --frames_per_story 8 --name_background \
    --output_dir "$OUT/targets"
python training_scripts/precompute_targets.py --pretrained_model_name_or_path "$OUT/char_ldm_decay" \
    --dataset synthsv --split validation --num_stories 200 --frames_per_story 8 --name_background \
    --no_store_images --output_dir "$OUT/targets_val"

echo "== 6/7 stage 2 (${STAGE2_STEPS} steps): caption-anchored mapper, identity-weighted L_align, grounding head, whole LLM trained"
python training_scripts/train_storygptv.py --pretrained_model_name_or_path "$OUT/char_ldm_decay" \
    --language_model_name_or_path "$OUT/lm" --targets_dir "$OUT/targets" --output_dir "$OUT/storygptv" \
    --mapper_hidden_size 128 --mapper_num_heads 4 --mapper_num_layers 2 --mapper_ffn_dim 512 \
    --mapper_queries caption --align_character_weight 8 --align_setting_weight 8 \
    --grounding head --train_language_model --story_config_overrides '{"context_window": 4}' \
    --train_batch_size 32 --learning_rate 1e-3 --lr_warmup_steps 100 \
    --max_train_steps "$STAGE2_STEPS" --checkpointing_steps 250 --checkpoints_total_limit 3 --seed 0 \
    --resume_from_checkpoint latest --validation_targets_dir "$OUT/targets_val"

echo "== 7/7 quality on SynthSV test stories"
python benchmarks/synthsv_quality.py --model "$OUT/storygptv" --stories "$EVAL_STORIES" --steps 30 \
    --guidance_scale 5
