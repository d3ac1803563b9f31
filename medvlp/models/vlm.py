"""The joint image-text model (CLIP/SigLIP style, as open_clip's ``CLIP``), with self-contained save/load."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.models.config import ModelConfig
from medvlp.models.image_refit import ImageRefit
from medvlp.models.registry import create_image_encoder
from medvlp.models.side_check import SideCheck
from medvlp.models.side_edit import SideEdit
from medvlp.models.text import TextEncoder

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "ImageEmbeddings", "MedVLP", "TextEmbeddings", "TowerProjection", "VLMOutput", "load_model"]

FORMAT = "medvlp-vlm/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_DIR = "text"


@dataclass
class ImageEmbeddings:
    """Image tower output in the shared space."""

    embedding: Tensor  # [B, E]
    tokens: Tensor  # [B, N, E]
    grid: tuple[int, ...]  # token grid (X, Y[, Z]), prod == N
    branch: Tensor | None = None  # [B, E]: the tower's fixed-statistics branch alone, projected (``with_branch``)


@dataclass
class TextEmbeddings:
    """Text tower output in the shared space."""

    embedding: Tensor  # [B, E]
    tokens: Tensor  # [B, T, E]
    attention_mask: Tensor  # [B, T]


@dataclass
class VLMOutput:
    """``MedVLP.forward`` output; features are L2-normalized when ``normalize=True``."""

    image_features: Tensor  # [B, E]
    text_features: Tensor  # [B, E]
    logit_scale: Tensor  # [] exp'd scale
    logit_bias: Tensor | None  # [] (SigLIP) or None (CLIP)
    image_tokens: Tensor  # [B, N, E]
    text_tokens: Tensor  # [B, T, E]
    text_mask: Tensor  # [B, T]
    image_grid: tuple[int, ...]
    image_branch: Tensor | None = None  # [B, E] (``with_branch``)


def _head(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    hidden = (in_dim + out_dim) // 2
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False))


class TowerProjection(nn.Module):
    """Projects a tower's global embedding and its tokens into the shared space.

    ``shared=True`` projects the tokens with the global head: the global loss then trains the token features that
    grounding compares with a phrase. A separate token head learns only from a local (token-level) loss.
    """

    def __init__(self, global_dim: int, token_dim: int, embed_dim: int, kind: str = "mlp", shared: bool = True) -> None:
        super().__init__()
        if shared and global_dim != token_dim:
            raise ValueError(
                f"token_projection 'shared' needs tokens as wide as the global embedding ({token_dim} != {global_dim});"
                " use token_projection: separate"
            )
        self.global_proj = _head(global_dim, embed_dim, kind)
        self.token_proj = None if shared else _head(token_dim, embed_dim, kind)

    def forward(self, embedding: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        token_head = self.global_proj if self.token_proj is None else self.token_proj
        return self.global_proj(embedding), token_head(tokens)


class MedVLP(nn.Module):
    """Image tower + text tower + projections into a shared ``embed_dim`` space + a learned logit scale/bias.

    Args:
        config: the model configuration.
        text_path: build the text tower from this folder instead of ``config.text_encoder``.
        load_pretrained: load the text weights and ``config.image_checkpoint``; False builds the architecture only
            (weights loaded afterwards, as :meth:`from_pretrained` does).
    """

    def __init__(
        self, config: ModelConfig, *, text_path: str | Path | None = None, load_pretrained: bool = True
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = create_image_encoder(
            config.image_encoder,
            config.spatial_dims,
            config.image_size,
            checkpoint=config.image_checkpoint if load_pretrained else None,
            **config.image_encoder_args,
        )
        self.text_encoder = TextEncoder(
            text_path if text_path is not None else config.text_encoder,
            num_layers=config.text_num_layers,
            max_length=config.text_max_length,
            pretrained=load_pretrained,
        )
        e = config.embed_dim
        enc = self.image_encoder
        shared = config.token_projection == "shared"
        self.image_projection = TowerProjection(enc.embed_dim, enc.token_dim, e, config.projection, shared)
        hidden = self.text_encoder.hidden_size
        self.text_projection = TowerProjection(hidden, hidden, e, config.projection, shared)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))
        bias = config.logit_bias_init
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None
        self.side_edit = SideEdit(e, config.side_edit) if config.side_edit else None  # fitted after training
        axis = config.side_check_axis
        self.side_check = SideCheck(axis) if axis is not None else None  # fitted after training
        self.image_refit = self.image_refit_module(config)  # fitted after training
        self.source_info: dict[str, Any] | None = None  # informational "source" of a loaded model folder

    @staticmethod
    def image_refit_module(config: ModelConfig) -> ImageRefit | None:
        """The (unfitted) image refit that ``config.image_refit`` names, or None."""
        if not config.image_refit:
            return None
        axis = int(config.image_encoder_args.get("laterality_axis", 0))
        cell = config.image_refit_cell
        return ImageRefit(config.embed_dim, config.spatial_dims, axis, config.image_refit, config.image_size, cell)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ---------------------------------------------------------------------------------------------------- image
    def forward_image(self, images: Tensor, normalize: bool = True, with_branch: bool = False) -> ImageEmbeddings:
        """One image-encoder pass: global embedding ``[B, E]`` and tokens ``[B, N, E]`` in the shared space; with
        ``with_branch`` also the tower's branch (``ImageEncoderOutput.branch``) alone through the global projection."""
        out = self.image_encoder(images)
        embedding, tokens = self.image_projection(out.embedding, out.tokens)
        grid = tuple(out.grid)
        if self.image_refit is not None:  # the tokens too when it has cells (else they stay the tower's)
            embedding, tokens, grid = self.image_refit.refit(images, embedding, tokens, grid)
        branch = None
        if with_branch:
            if out.branch is None:
                raise ValueError(f"{type(self.image_encoder).__name__} has no branch to align on its own")
            branch = self.image_projection.global_proj(out.branch)
        if normalize:
            embedding, tokens = F.normalize(embedding, dim=-1), F.normalize(tokens, dim=-1)
            branch = None if branch is None else F.normalize(branch, dim=-1)
        return ImageEmbeddings(embedding=embedding, tokens=tokens, grid=grid, branch=branch)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Global image features ``[B, E]``."""
        return self.forward_image(images, normalize).embedding

    def encode_image_tokens(self, images: Tensor, normalize: bool = True) -> tuple[Tensor, tuple[int, ...]]:
        """Patch/voxel features ``[B, N, E]`` and their grid."""
        out = self.forward_image(images, normalize)
        return out.tokens, out.grid

    # ----------------------------------------------------------------------------------------------------- text
    def _text_batch(self, texts: Sequence[str] | dict[str, Tensor]) -> dict[str, Tensor]:
        batch = self.text_encoder.tokenize(texts) if not isinstance(texts, dict) else texts
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: batch[k].to(self.device) for k in keys if batch.get(k) is not None}

    def forward_text(self, texts: Sequence[str] | dict[str, Tensor], normalize: bool = True) -> TextEmbeddings:
        """Text features: strings are tokenized on the model's device; a dict needs ``input_ids``/``attention_mask``."""
        batch = self._text_batch(texts)
        out = self.text_encoder(**batch)
        embedding, tokens = self.text_projection(out.embedding, out.tokens)
        if normalize:
            embedding, tokens = F.normalize(embedding, dim=-1), F.normalize(tokens, dim=-1)
        return TextEmbeddings(embedding=embedding, tokens=tokens, attention_mask=out.attention_mask)

    def encode_text(self, texts: Sequence[str] | dict[str, Tensor], normalize: bool = True) -> Tensor:
        """Global text features ``[B, E]``; strings get the model's side edit when it has one
        (:mod:`medvlp.models.side_edit`), token batches are the tower alone."""
        embedding = self.forward_text(texts, normalize).embedding
        if self.side_edit is None or isinstance(texts, dict):
            return embedding
        return self.side_edit(list(texts), embedding, lambda more: self.forward_text(more, True).embedding)

    # ---------------------------------------------------------------------------------------------------- joint
    def score_pairs(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """``[B]``: the score of each image ``[B, C, *size]`` with its text: the cosine of the global embeddings (the
        text with the side edit, :meth:`encode_text`) plus the side check's term when the model has one
        (:mod:`medvlp.models.side_check`: a one-sided sentence read against where its finding is on the tokens)."""
        cosine, term = self.pair_score_parts(self.forward_image(images.to(self.device)), texts)
        return cosine + term

    def pair_score_parts(self, image: ImageEmbeddings, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """The two parts of :meth:`score_pairs` for an image pass's output (``[B]`` rows, unit embeddings) and one
        text per row: ``(cosine [B], side check term [B])``, the term zero without a check or where it does not act."""
        cosine = (image.embedding * F.normalize(self.encode_text(list(texts)), dim=-1)).sum(-1).float()
        if self.side_check is None:
            return cosine, torch.zeros_like(cosine)
        encode = lambda more: self.forward_text(more).embedding  # noqa: E731
        return cosine, self.side_check(list(texts), image.tokens, image.grid, encode)

    def forward(
        self,
        images: Tensor,
        text_inputs: Sequence[str] | dict[str, Tensor],
        normalize: bool = True,
        with_branch: bool = False,
    ) -> VLMOutput:
        """Encode a batch of image-text pairs."""
        image = self.forward_image(images, normalize, with_branch)
        text = self.forward_text(text_inputs, normalize)
        return VLMOutput(
            image_features=image.embedding,
            text_features=text.embedding,
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
            image_tokens=image.tokens,
            text_tokens=text.tokens,
            text_mask=text.attention_mask,
            image_grid=image.grid,
            image_branch=image.branch,
        )

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        """Freeze the image encoder except its last ``unlocked_groups`` layer groups; projections stay trainable."""
        self.image_encoder.lock(unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text encoder except its last ``unlocked_layers`` layers; projections stay trainable."""
        self.text_encoder.lock(unlocked_layers, freeze_layer_norm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers."""
        self.image_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------------------------------------ save/load
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a self-contained model folder: ``config.json``, ``model.safetensors`` and ``text/``.

        ``text/`` holds the tokenizer and the (possibly truncated) text model config; the weights of both towers
        are in ``model.safetensors``. No machine path is written: ``text_encoder`` becomes ``"text"`` (relative to
        the folder) and ``image_checkpoint`` is dropped (its weights are saved); their original names are kept,
        without directories, under ``"source"`` for information.
        """
        from safetensors.torch import save_model

        from medvlp import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        portable = self.config.model_copy(update={"text_encoder": TEXT_DIR, "image_checkpoint": None})
        cfg = self.config
        source = self.source_info or {
            "text_encoder": Path(cfg.text_encoder).name if cfg.text_encoder else "all-MiniLM-L6-v2 (bundled)",
            "image_checkpoint": Path(cfg.image_checkpoint).name if cfg.image_checkpoint else None,
        }
        meta = {
            "format": FORMAT,
            "medvlp_version": __version__,
            "config": portable.model_dump(mode="json"),
            "source": source,
        }
        self.text_encoder.save_config(folder / TEXT_DIR)
        # save_model drops duplicates of shared/tied tensors; load_model restores them
        save_model(self, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT}, force_contiguous=True)
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        logger.info("saved %s model to %s", FORMAT, folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> MedVLP:
        """Load a folder written by :meth:`save_pretrained` (needs nothing outside it).

        Returns:
            The model on ``map_location``, in eval mode (call ``.train()`` to fine-tune).
        """
        from safetensors.torch import load_model as load_safetensors

        folder = Path(folder)
        meta = _read_meta(folder)
        if meta is None:
            raise FileNotFoundError(f"{folder} is not a medvlp model folder ({CONFIG_FILE} with format {FORMAT!r})")
        config = ModelConfig.model_validate({**meta["config"], "text_encoder": str(folder / TEXT_DIR)})
        model = cls(config, text_path=folder / TEXT_DIR, load_pretrained=False)
        missing, unexpected = load_safetensors(model, str(folder / WEIGHTS_FILE), strict=False)
        # the side edit and check are rewritten after training (config.json and the weights, one after the other): a
        # folder caught between the two loads without them, and the resumed fit writes them again
        fitted = ("side_edit.", "side_check.", "image_refit.")
        wrong = [k for k in [*missing, *unexpected] if not k.startswith(fitted)]
        if wrong:
            raise RuntimeError(f"{folder / WEIGHTS_FILE} does not match {CONFIG_FILE}: keys {sorted(wrong)[:8]}")
        for prefix in fitted:
            if any(k.startswith(prefix) for k in missing):
                setattr(model, prefix[:-1], None)
        model.source_info = meta.get("source")
        return model.to(map_location).eval()


def _read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("medvlp-vlm/"):
        return None
    if meta["format"] != FORMAT:
        raise ValueError(f"{path} has model format {meta['format']!r}; this medvlp reads {FORMAT!r}")
    return meta


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> MedVLP:
    """Load a model folder, or the model of a run folder (see :func:`medvlp.artifacts.find_model_dir`).

    Raises:
        FileNotFoundError: nothing found; the message lists the places looked at.
    """
    from medvlp.artifacts import find_model_dir

    folder = find_model_dir(path)
    logger.info("loading model from %s", folder)
    return MedVLP.from_pretrained(folder, map_location=map_location)
