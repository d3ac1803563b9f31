"""Joint model: shapes, locking, checkpointing, save/load and the config."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import medvlp.models.text as text_module
from medvlp.models import MedVLP, ModelConfig, default_text_model_path, load_model

TEXTS = ["No pleural effusion.", "Large right pneumothorax.", "Cardiomegaly with mild edema."]
SIZE = (32, 48)


@pytest.fixture(scope="module")
def base_model() -> MedVLP:
    torch.manual_seed(0)
    config = ModelConfig(image_encoder="tiny_vit", spatial_dims=2, image_size=SIZE, text_num_layers=1, embed_dim=16)
    return MedVLP(config)


@pytest.fixture()
def model(base_model: MedVLP) -> MedVLP:
    return copy.deepcopy(base_model)


def _images(n: int = 3, size: tuple[int, ...] = SIZE) -> torch.Tensor:
    return torch.randn(n, 1, *size)


def test_forward_shapes_and_normalization(model: MedVLP) -> None:
    out = model(_images(), TEXTS)
    e = model.config.embed_dim
    assert out.image_features.shape == (3, e) and out.text_features.shape == (3, e)
    assert out.image_grid == (4, 6) and out.image_tokens.shape == (3, 24, e)
    t = out.text_mask.shape[1]
    assert out.text_tokens.shape == (3, t, e)
    for feats in (out.image_features, out.text_features, out.image_tokens):
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(feats.shape[:-1]))
    assert out.logit_bias is None
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)
    raw = model.forward_image(_images(), normalize=False)
    assert not torch.allclose(raw.embedding.norm(dim=-1), torch.ones(3))


def test_encode_methods_agree(model: MedVLP) -> None:
    model.eval()
    images = _images()
    with torch.no_grad():
        full = model.forward_image(images)
        tokens, grid = model.encode_image_tokens(images)
        torch.testing.assert_close(model.encode_image(images), full.embedding)
        torch.testing.assert_close(tokens, full.tokens)
        assert grid == full.grid
        from_strings = model.encode_text(TEXTS)
        from_dict = model.encode_text(model.text_encoder.tokenize(TEXTS))
    torch.testing.assert_close(from_strings, from_dict)
    assert from_strings.shape == (3, model.config.embed_dim)


def test_siglip_3d_linear() -> None:
    config = ModelConfig(
        image_encoder="tiny_resnet",
        spatial_dims=3,
        image_size=(32, 32, 24),
        text_num_layers=1,
        embed_dim=8,
        projection="linear",
        loss="siglip",
    )
    model = MedVLP(config)
    out = model(_images(2, (32, 32, 24)), TEXTS[:2])
    assert out.image_features.shape == (2, 8) and len(out.image_grid) == 3
    assert math.isclose(out.logit_scale.item(), 10.0, rel_tol=1e-5)
    assert out.logit_bias is not None and out.logit_bias.item() == -10.0
    assert isinstance(model.image_projection.global_proj, torch.nn.Linear)


def test_lock_image_tower_freezes_only_the_image_encoder(model: MedVLP) -> None:
    model.lock_image_tower()
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    for module in (model.text_encoder, model.image_projection, model.text_projection):
        assert all(p.requires_grad for p in module.parameters())
    assert model.logit_scale.requires_grad
    model.lock_image_tower(unlocked_groups=1)
    assert any(p.requires_grad for p in model.image_encoder.parameters())
    model.lock_text_tower()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert all(p.requires_grad for p in model.text_projection.parameters())


def _clip_step(model: MedVLP, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # same dropout masks in both runs
    out = model(images, TEXTS)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    labels = torch.arange(len(TEXTS))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss = loss + out.image_tokens.mean() + (out.text_tokens * out.text_mask[..., None]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_same_loss_and_grads(model: MedVLP) -> None:
    model.train()
    images = _images()
    loss_a, grads_a = _clip_step(model, images)
    model.set_grad_checkpointing(True)
    assert model.image_encoder.grad_checkpointing and model.text_encoder.model.is_activation_checkpointing
    loss_b, grads_b = _clip_step(model, images)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == sum(1 for p in model.parameters() if p.requires_grad)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5, msg=name)


def _strings(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_save_and_load_roundtrip(model: MedVLP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model.eval()
    folder = model.save_pretrained(tmp_path / "run" / "stage2-align" / "model")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "text"} <= names
    text_files = {p.name for p in (folder / "text").iterdir()}
    assert {"config.json", "tokenizer_config.json"} <= text_files
    assert text_files & {"tokenizer.json", "vocab.txt"}

    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "medvlp-vlm/1" and meta["medvlp_version"]
    assert meta["config"]["text_encoder"] == "text" and meta["config"]["image_checkpoint"] is None
    for value in _strings(meta):
        assert not os.path.isabs(value), value
    raw = (folder / "config.json").read_text()
    assert str(tmp_path) not in raw and str(default_text_model_path()) not in raw

    # loading must not touch the original text model folder
    def no_default() -> Path:
        raise AssertionError("the bundled text model was used while loading a saved model")

    monkeypatch.setattr(text_module, "default_text_model_path", no_default)
    loaded = MedVLP.from_pretrained(folder)
    assert not loaded.training and loaded.text_encoder.num_layers == 1
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_text(TEXTS), model.encode_text(TEXTS), atol=0, rtol=0)
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale)

    found = load_model(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(found.encode_text(TEXTS), model.encode_text(TEXTS), atol=0, rtol=0)


def test_load_model_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    monkeypatch.setattr(
        MedVLP, "from_pretrained", classmethod(lambda cls, folder, map_location="cpu": opened.append(folder))
    )

    def fake_model(folder: Path, mtime: float) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"format": "medvlp-vlm/1"}))
        os.utime(folder / "config.json", (mtime, mtime))

    run = tmp_path / "run"
    fake_model(run / "stage0" / "model", 1_000)
    fake_model(run / "stage1-mlm" / "model", 2_000)
    fake_model(run / "later" / "model", 1_500)
    load_model(run)
    assert opened[-1] == run / "stage1-mlm" / "model"  # the newest */model
    fake_model(run / "model", 0)
    load_model(run)
    assert opened[-1] == run / "model"
    fake_model(run / "stage2-align" / "model", 0)
    load_model(run)
    assert opened[-1] == run / "stage2-align" / "model"
    load_model(run / "later" / "model")
    assert opened[-1] == run / "later" / "model"
    with pytest.raises(FileNotFoundError, match="stage2-align") as err:
        load_model(tmp_path / "empty")
    assert "*/model" in str(err.value)
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "config.json").write_text(json.dumps({"format": "medvlp-vlm/9"}))
    with pytest.raises(ValueError, match="medvlp-vlm/9"):
        load_model(tmp_path / "future")


def test_image_checkpoint_in_config(tmp_path: Path) -> None:
    from medvlp.models import create_image_encoder

    encoder = create_image_encoder("tiny_vit", 2, SIZE)
    ckpt = tmp_path / "my_encoder.pt"
    torch.save({"model": encoder.state_dict()}, ckpt)
    config = ModelConfig(
        image_encoder="tiny_vit", spatial_dims=2, image_size=SIZE, text_num_layers=1, image_checkpoint=str(ckpt)
    )
    model = MedVLP(config)
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(model.image_encoder.state_dict()[key], value, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert meta["config"]["image_checkpoint"] is None and meta["source"]["image_checkpoint"] == "my_encoder.pt"


def test_config_validation_names_the_bad_value() -> None:
    good = {"image_encoder": "tiny_vit", "spatial_dims": 2, "image_size": (32, 32)}
    with pytest.raises(ValidationError, match="tiny_vitt"):
        ModelConfig(**{**good, "image_encoder": "tiny_vitt"})
    with pytest.raises(ValidationError, match="4"):
        ModelConfig(**{**good, "spatial_dims": 4})
    with pytest.raises(ValidationError, match="softmax"):
        ModelConfig(**{**good, "loss": "softmax"})
    with pytest.raises(ValidationError, match=r"\(32, 32\)"):
        ModelConfig(**{**good, "spatial_dims": 3})
    with pytest.raises(ValidationError, match="tiny_timm_vit"):
        ModelConfig(**{**good, "image_encoder": "tiny_timm_vit", "spatial_dims": 3, "image_size": (8, 8, 8)})
    with pytest.raises(ValidationError, match="extra"):
        ModelConfig(**good, batch_size=3)
    config = ModelConfig(**{**good, "image_size": 32, "loss": "siglip", "init_logit_scale": 1.0})
    assert config.image_size == (32, 32) and config.logit_scale_init == 1.0 and config.logit_bias_init == -10.0
    with pytest.raises(ValidationError):
        config.embed_dim = 3  # frozen


def test_tokens_share_the_global_projection_so_the_global_loss_trains_grounding() -> None:
    torch.manual_seed(0)
    config = ModelConfig(image_encoder="tiny_vit", spatial_dims=2, image_size=SIZE, text_num_layers=1, embed_dim=16)
    model = MedVLP(config)
    assert model.image_projection.token_proj is None and model.text_projection.token_proj is None
    images = _images()
    model.zero_grad(set_to_none=True)
    out = model(images, TEXTS)  # a global loss only: tokens play no part in it
    (out.logit_scale * out.image_features @ out.text_features.T).logsumexp(dim=1).mean().backward()
    grads = {n for n, p in model.image_projection.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in model.image_projection.named_parameters()}  # = every head that projects tokens
    head = model.image_projection.global_proj
    tokens = model.image_encoder(images).tokens
    assert torch.allclose(model.forward_image(images, normalize=False).tokens, head(tokens))

    separate = MedVLP(config.model_copy(update={"token_projection": "separate"}))
    assert separate.image_projection.token_proj is not None
    with pytest.raises(ValueError, match="token_projection: separate"):
        from medvlp.models.vlm import TowerProjection

        TowerProjection(8, 4, 16)
