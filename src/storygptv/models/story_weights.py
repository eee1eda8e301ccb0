"""Which weights of the story model train, and how they are kept and saved.

StoryGPT-V stage 2 trains the visual projection, the mapper (and grounding head), optional LoRA adapters of the
LLM and, of the LLM itself, only the R ``[IMG]`` rows of its embedding (and of an untied output head): a gradient
row mask keeps every other row frozen, decoupled weight decay never touches the frozen rows, the ``[IMG]`` rows
are rescaled to the norm of the others after each step (method notes section 3.1), and a checkpoint stores just
those rows. :class:`StoryWeightsMixin` holds these rules for
:class:`~storygptv.models.modeling_storygptv.StoryGPTVForConditionalGeneration`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..loading import realign_cpu_tensors

__all__ = ["IMG_ROWS_SUFFIX", "StoryWeightsMixin"]

#: Key suffix of the ``[IMG]`` rows of a row-masked matrix in :meth:`StoryWeightsMixin.trainable_state_dict`.
IMG_ROWS_SUFFIX = "@img_rows"


class StoryWeightsMixin:
    """Trainable weights of the story model: LoRA adapters, the ``[IMG]`` row mask, optimizer groups, saving.

    Expects ``self.config`` (a ``StoryGPTVConfig``), ``self.language_model`` and the embedding accessors of a
    ``PreTrainedModel``; the model calls :meth:`inject_lora` while it is built and :meth:`freeze_language_model`
    after ``post_init``.
    """

    def inject_lora(self) -> None:
        """Inject LoRA adapters of ``config.lora_rank`` into the LLM (their weights live in ``model.safetensors``)."""
        from peft import LoraConfig, inject_adapter_in_model

        cfg = self.config
        targets = cfg.lora_target_modules
        if targets is None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

            model_type = cfg.text_config.model_type
            targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
            if targets is None:
                raise ValueError(
                    f"peft has no default LoRA target modules for model_type {model_type!r}; set "
                    "`lora_target_modules` in the config."
                )
        lora_config = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(targets),
            bias="none",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. GPT-2 Conv1D fan_in_fan_out notice
            inject_adapter_in_model(lora_config, self.language_model)
        # peft initialises the adapters (lora_B = 0); keep `post_init` from re-drawing them.
        for name, module in self.language_model.named_modules():
            if "lora_" in name:
                for sub in module.modules():
                    sub._is_hf_initialized = True

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, **kwargs: Any
    ) -> nn.Embedding:
        """Resize the LLM vocabulary; refused (before anything changes) below the ``[IMG]`` / ``<|image|>`` ids."""
        needed = [*(self.config.img_token_ids or []), self.config.image_token_id]
        needed = [i for i in needed if i is not None]
        if new_num_tokens is not None and needed and new_num_tokens <= max(needed):
            raise ValueError(
                f"`new_num_tokens` ({new_num_tokens}) would drop the story tokens: the [IMG] / <|image|> ids go up to "
                f"{max(needed)}. Keep at least {max(needed) + 1} tokens."
            )
        out = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
        self._refresh_trainable_rows()
        return out

    def freeze_language_model(self, freeze: bool = True) -> None:
        """Freeze (or unfreeze) the LLM. Frozen: only LoRA adapters and the ``[IMG]`` embedding rows (plus the
        ``[IMG]`` rows of an untied output head) receive gradients; the row mask is installed here."""
        self._llm_frozen = freeze
        for name, param in self.language_model.named_parameters():
            param.requires_grad_((not freeze) or "lora_" in name)
        self._refresh_trainable_rows()

    def _img_row_weights(self) -> list[nn.Parameter]:
        weights = [self.get_input_embeddings().weight]
        head = self.get_output_embeddings()
        if head is not None and head.weight is not weights[0]:
            weights.append(head.weight)
        return weights

    def _refresh_trainable_rows(self) -> None:
        for handle in self._grad_mask_handles:
            handle.remove()
        self._grad_mask_handles, self._grad_masked_params = [], []
        if not self._llm_frozen or not self.config.img_token_ids:
            return
        for weight in self._img_row_weights():
            mask = torch.zeros(weight.shape[0], 1, dtype=torch.bool)
            mask[self.config.img_token_ids] = True
            weight.requires_grad_(True)

            def _hook(grad: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                return grad * mask.to(device=grad.device, dtype=grad.dtype)

            self._grad_mask_handles.append(weight.register_hook(_hook))
            self._grad_masked_params.append(id(weight))

    def _ensure_trainable_rows(self) -> None:
        # Parameters can be swapped under us (loading, resizing, `.to(meta)` tricks): re-attach the row mask.
        if self._llm_frozen and [id(w) for w in self._img_row_weights()] != self._grad_masked_params:
            self.freeze_language_model(True)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, tuple):  # output_loading_info=True
            model[0]._reapply_freezing()
        else:
            model._reapply_freezing()
        return model

    def _reapply_freezing(self) -> None:
        realign_cpu_tensors(self)
        if self.config.freeze_language_model:
            self.freeze_language_model(True)

    def trainable_parameter_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the trainable parameters.

        The embedding matrix (and an untied head) is trainable only through the ``[IMG]`` row mask; decoupled
        weight decay (AdamW) would still shrink its frozen rows, so these matrices always get
        ``weight_decay=0``. Everything else trainable (visual projection, mapper, LoRA) gets ``weight_decay``.

        Example:
            >>> from storygptv.testing.story_model import tiny_story_model
            >>> model, _ = tiny_story_model()
            >>> opt = torch.optim.AdamW(model.trainable_parameter_groups(weight_decay=0.01), lr=1e-3)
        """
        row_masked = {id(w) for w in self._img_row_weights()} if self._llm_frozen else set()
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if id(param) in row_masked else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only, on the CPU: every trainable parameter, except that a row-masked matrix
        (the embedding, an untied head) contributes just its ``[IMG]`` rows, under ``"<name>@img_rows"``.

        This is what a stage-2 checkpoint needs: the frozen LLM is not copied.
        """
        masked = {id(w) for w in self._img_row_weights()} if self._llm_frozen else set()
        ids = torch.tensor(self.config.img_token_ids or [])
        state = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in masked:
                state[name + IMG_ROWS_SUFFIX] = param.detach()[ids.to(param.device)].cpu().contiguous()
            else:
                state[name] = param.detach().cpu().contiguous()
        return state

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`trainable_state_dict` back (the ``[IMG]`` rows into their matrices)."""
        params = dict(self.named_parameters())
        ids = torch.tensor(self.config.img_token_ids or [])
        for key, value in state.items():
            name = key[: -len(IMG_ROWS_SUFFIX)] if key.endswith(IMG_ROWS_SUFFIX) else key
            if name not in params:
                raise KeyError(f"The state holds {key!r}, which this story model does not have.")
            param = params[name]
            if key.endswith(IMG_ROWS_SUFFIX):
                param[ids.to(param.device)] = value.to(param.device, param.dtype)
            else:
                param.copy_(value.to(param.device, param.dtype))

    @torch.no_grad()
    def renormalize_img_embeddings(self, include_output_head: bool = False) -> None:
        """Rescale every ``[IMG]`` input-embedding row to the mean L2 norm of the other (frozen) rows.

        Call it after each optimiser step (method notes section 3.1). With ``include_output_head`` the
        ``[IMG]`` rows of an untied output head are rescaled the same way.
        """
        if not self.config.img_token_ids:
            raise ValueError("The config has no `img_token_ids`; nothing to renormalise.")
        weights = self._img_row_weights()
        if not include_output_head:
            weights = weights[:1]
        ids = torch.tensor(self.config.img_token_ids, device=weights[0].device)
        for weight in weights:
            keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[ids] = False
            target = weight[keep].float().norm(dim=-1).mean()
            rows = weight[ids].float()
            rows = rows * (target / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            weight[ids] = rows.to(weight.dtype)
