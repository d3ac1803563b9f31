"""Text encoder: the bundled MiniLM, pooled as sentence-transformers pools it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medvlp.models import TextEncoder, default_text_model_path

SENTENCES = ["No pleural effusion.", "There is no pleural effusion.", "Large right pneumothorax."]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder().eval()


def test_matches_sentence_transformers(minilm: TextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(default_text_model_path()), device="cpu")
    expected = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    ours = minilm.embed(SENTENCES)  # [3, 384]
    assert ours.shape == (3, 384)
    cosine = F.cosine_similarity(F.normalize(ours, dim=-1), F.normalize(expected, dim=-1), dim=-1)
    assert (cosine > 0.9999).all(), cosine


def test_pretrained_similarity_is_meaningful(minilm: TextEncoder) -> None:
    emb = F.normalize(minilm.embed(SENTENCES), dim=-1)
    same, different = emb[0] @ emb[1], emb[0] @ emb[2]
    assert same > different + 0.1, (same, different)


def test_forward_outputs_and_padding_invariance(minilm: TextEncoder) -> None:
    batch = minilm.tokenize([SENTENCES[0], "A much longer report text that forces padding of the first sentence here."])
    with torch.no_grad():
        out = minilm(**batch)
        alone = minilm(**minilm.tokenize([SENTENCES[0]]))
    b, t = batch["input_ids"].shape
    assert out.tokens.shape == (b, t, minilm.hidden_size) and out.embedding.shape == (b, minilm.hidden_size)
    assert torch.equal(out.attention_mask, batch["attention_mask"])
    assert batch["attention_mask"][0].sum() < t  # the first text is padded
    torch.testing.assert_close(out.embedding[0], alone.embedding[0], atol=1e-5, rtol=1e-5)


def test_truncation_and_max_length() -> None:
    enc = TextEncoder(num_layers=1, max_length=16)
    batch = enc.tokenize(["word " * 100, "short"])
    assert batch["input_ids"].shape == (2, 16)
    assert TextEncoder(num_layers=1, max_length=10_000).max_length == 512  # capped by the model's positions


def test_num_layers_keeps_the_first_layers(minilm: TextEncoder) -> None:
    small = TextEncoder(num_layers=2)
    assert small.num_layers == 2 and len(small.model.encoder.layer) == 2
    full, part = minilm.model.state_dict(), small.model.state_dict()
    for key, value in part.items():
        torch.testing.assert_close(value, full[key], atol=0, rtol=0, msg=key)
    assert not any("pooler" in name for name, _ in small.model.named_parameters())
    with pytest.raises(ValueError, match="num_layers=7"):
        TextEncoder(num_layers=7)


def test_lock_keeps_last_layers_trainable() -> None:
    enc = TextEncoder(num_layers=2)
    enc.lock()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.lock(unlocked_layers=1)
    trainable = {n for n, p in enc.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layer.1.") for n in trainable)
    enc.lock(unlocked_layers=0, freeze_layer_norm=False)
    assert {n for n, p in enc.model.named_parameters() if p.requires_grad} == {
        n for n, _ in enc.model.named_parameters() if "LayerNorm" in n
    }


def test_grad_checkpointing_toggles() -> None:
    enc = TextEncoder(num_layers=1)
    enc.set_grad_checkpointing(True)
    assert enc.model.is_activation_checkpointing
    enc.set_grad_checkpointing(False)
    assert not enc.model.is_activation_checkpointing


def test_missing_folder_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        TextEncoder(tmp_path)
    (tmp_path / "config.json").write_text((default_text_model_path() / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        TextEncoder(tmp_path)
