"""Zero-shot prompts and probabilities, and the classification metrics against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

from medvlp.models import MedVLP, ModelConfig
from medvlp.tasks.zeroshot import (
    DEFAULT_TEMPLATES,
    build_prompt_embeddings,
    classification_metrics,
    embed_prompt_sets,
    expected_calibration_error,
    finding_text,
    model_logit_scale,
    prompt_spec,
    render_prompts,
    threshold_at_sensitivity,
    zero_shot_probabilities,
)

FINDINGS = ["pleural_effusion", "pneumothorax", "cardiomegaly"]


@pytest.fixture(scope="module")
def model() -> MedVLP:
    torch.manual_seed(0)
    config = ModelConfig(image_encoder="tiny_vit", spatial_dims=2, image_size=(64, 64), text_num_layers=1, embed_dim=32)
    return MedVLP(config)


def _labels_probs(n: int = 200, f: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(n, f)).astype(float)
    probs = np.clip(0.5 * labels + 0.6 * rng.random((n, f)) - 0.05, 0, 1)
    labels[rng.random((n, f)) < 0.1] = -1
    labels[rng.random((n, f)) < 0.1] = np.nan
    return labels, probs


def test_prompt_rendering() -> None:
    assert finding_text("pleural_effusion") == "pleural effusion"
    prompts = render_prompts("pleural_effusion")
    assert "There is pleural effusion." in prompts["positive"]
    assert "Pleural effusion is present." in prompts["positive"]
    assert "No pleural effusion." in prompts["negative"]
    assert len(prompts["positive"]) == len(DEFAULT_TEMPLATES["positive"])
    with_syn = render_prompts("cardiomegaly", synonyms={"cardiomegaly": ["enlarged heart", "cardiomegaly"]})
    assert "There is enlarged heart." in with_syn["positive"] and "No cardiomegaly." in with_syn["negative"]
    assert len(with_syn["negative"]) == 2 * len(DEFAULT_TEMPLATES["negative"])  # duplicate name dropped


def test_prompt_embeddings_real_text_tower(model: MedVLP) -> None:
    model.train()
    emb = build_prompt_embeddings(model, FINDINGS, batch_size=5)
    assert model.training  # mode restored
    assert emb.shape == (3, 2, model.config.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3, 2))
    # positive and negative prompts of a finding differ; the result is the renormalized mean of the prompts
    assert not torch.allclose(emb[:, 0], emb[:, 1])
    model.eval()
    with torch.no_grad():
        pos = model.encode_text(render_prompts("pneumothorax")["positive"])
    torch.testing.assert_close(emb[1, 0], F.normalize(F.normalize(pos, dim=-1).mean(0), dim=0), atol=1e-5, rtol=0)


def test_zero_shot_probabilities_constructed() -> None:
    basis = torch.eye(4)
    prompts = torch.stack([torch.stack([basis[0], basis[1]]), torch.stack([basis[2], basis[3]])])  # [2, 2, 4]
    images = torch.stack([basis[0] * 3, basis[1] + basis[2]])  # [2, 4]
    probs = zero_shot_probabilities(images, prompts, logit_scale=10.0)
    assert probs.shape == (2, 2)
    assert probs[0, 0] > 0.5  # image equals the positive prompt of finding 0
    assert math.isclose(probs[0, 0], 1 / (1 + math.exp(-10.0)), rel_tol=1e-9)
    assert math.isclose(probs[0, 1], 0.5)  # orthogonal to both prompts of finding 1
    assert probs[1, 0] < 0.5 and probs[1, 1] > 0.5


def test_zero_shot_end_to_end(model: MedVLP) -> None:
    emb = build_prompt_embeddings(model, FINDINGS)
    with torch.no_grad():
        feats = model.encode_image(torch.rand(5, 1, 64, 64))
    probs = zero_shot_probabilities(feats, emb, model_logit_scale(model))
    assert probs.shape == (5, 3) and np.all((probs > 0) & (probs < 1))
    assert math.isclose(model_logit_scale(model), 1 / 0.07, rel_tol=1e-5)


def test_metrics_match_sklearn_with_exclusions() -> None:
    labels, probs = _labels_probs()
    out = classification_metrics(labels, probs, FINDINGS, threshold=0.4)
    for j, name in enumerate(FINDINGS):
        keep = np.isin(labels[:, j], (0, 1))
        y, p = labels[keep, j].astype(int), probs[keep, j]
        m = out["per_finding"][name]
        assert m["n_pos"] == y.sum() and m["n_neg"] == (y == 0).sum() and m["n_pos"] + m["n_neg"] < len(labels)
        assert math.isclose(m["auroc"], roc_auc_score(y, p))
        assert math.isclose(m["auprc"], average_precision_score(y, p))
        assert math.isclose(m["f1"], f1_score(y, p >= 0.4))
        assert math.isclose(m["ece"], expected_calibration_error(y, p))
        assert m["threshold"] == 0.4
    mean = np.mean([out["per_finding"][f]["auroc"] for f in FINDINGS])
    assert math.isclose(out["mean_auroc"], mean) and out["n_findings"] == 3


def test_youden_threshold() -> None:
    labels, probs = _labels_probs(seed=1)
    out = classification_metrics(labels, probs, FINDINGS, threshold="youden")
    for j, name in enumerate(FINDINGS):
        keep = np.isin(labels[:, j], (0, 1))
        y, p = labels[keep, j].astype(int), probs[keep, j]
        fpr, tpr, thr = roc_curve(y, p)
        best = thr[1:][np.argmax((tpr - fpr)[1:])]
        m = out["per_finding"][name]
        assert math.isclose(m["threshold"], best)
        assert math.isclose(m["f1"], f1_score(y, p >= best))


def test_single_class_finding_excluded_from_mean() -> None:
    labels, probs = _labels_probs()
    labels[:, 2] = np.where(np.isnan(labels[:, 2]), np.nan, 0.0)
    out = classification_metrics(labels, probs, FINDINGS)
    assert math.isnan(out["per_finding"]["cardiomegaly"]["auroc"])
    assert out["per_finding"]["cardiomegaly"]["n_pos"] == 0
    assert out["n_findings"] == 2
    assert math.isclose(out["mean_auroc"], np.mean([out["per_finding"][f]["auroc"] for f in FINDINGS[:2]]))


def test_ece_hand_computed() -> None:
    # 15 bins of width 1/15: 0.05 -> 0, 0.1 & 0.12 -> 1, 0.18 -> 2, 0.5 -> 7, 0.95 & 0.99 -> 14
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    p = np.array([0.05, 0.1, 0.5, 0.95, 0.99, 0.5, 0.12, 0.18])
    # bin 0: |0 - 0.05|; bin 1: |1 - 0.11| * 2; bin 2: |0 - 0.18|; bin 7: |0 - 0.5| * 2; bin 14: |1 - 0.97| * 2
    expected = (0.05 + 2 * 0.89 + 0.18 + 2 * 0.5 + 2 * 0.03) / 8
    assert math.isclose(expected_calibration_error(y, p), expected)
    # -1 / NaN rows are ignored
    y2 = np.array([*y, -1, np.nan], dtype=float)
    p2 = np.array([*p, 0.3, 0.7])
    assert math.isclose(expected_calibration_error(y2, p2), expected)
    assert expected_calibration_error(np.array([1.0]), np.array([1.0])) == 0.0


def test_threshold_at_sensitivity() -> None:
    labels, probs = _labels_probs(seed=2)
    for target in (0.5, 0.9, 1.0):
        thr = threshold_at_sensitivity(labels, probs, target)
        assert thr.shape == (3,)
        for j in range(3):
            keep = np.isin(labels[:, j], (0, 1))
            y, p = labels[keep, j], probs[keep, j]
            # brute force: the largest candidate threshold reaching the target sensitivity
            ok = [t for t in np.unique(p) if (p[y == 1] >= t).mean() >= target]
            assert math.isclose(thr[j], max(ok))
    assert math.isnan(threshold_at_sensitivity(np.zeros(4), np.ones(4)))
    with pytest.raises(ValueError):
        threshold_at_sensitivity(np.ones(3), np.ones(3), target=0.0)


def test_operating_points_reach_the_target_sensitivity() -> None:
    from medvlp.tasks.zeroshot import operating_points

    labels = np.array([[1, 0], [1, 0], [1, 0], [0, 0], [0, 0], [-1, np.nan]], dtype=float)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.3], [0.5, 0.4], [0.1, 0.5], [0.99, 0.6]])
    thresholds = threshold_at_sensitivity(labels, probs, 0.6)
    pts = operating_points(labels, probs, ["a", "b"], thresholds)
    a = pts["a"]  # 2 of 3 positives needed: threshold 0.8 -> TP 2, FN 1, FP 0 (0.5 < 0.8), TN 2
    assert a["threshold"] == 0.8 and a["sensitivity"] == 2 / 3 and a["specificity"] == 1.0
    assert a["ppv"] == 1.0 and a["npv"] == 2 / 3 and (a["n_pos"], a["n_neg"]) == (3, 2)
    assert math.isnan(pts["b"]["threshold"]) and "specificity" not in pts["b"]  # no positives, no threshold


def test_the_operating_point_is_fitted_on_val_and_scored_on_test() -> None:
    from medvlp.tasks.zeroshot import zero_shot_metrics

    val_labels, val_probs = _labels_probs(seed=1)
    labels, probs = _labels_probs(seed=2)
    out = zero_shot_metrics(labels, probs, FINDINGS, val_labels, val_probs, target_sensitivity=0.9)
    fitted_on_val = threshold_at_sensitivity(val_labels, val_probs, 0.9)
    fitted_on_test = threshold_at_sensitivity(labels, probs, 0.9)
    per = out["operating_point"]["per_finding"]
    assert [per[f]["threshold"] for f in FINDINGS] == list(fitted_on_val)
    assert list(fitted_on_val) != list(fitted_on_test)  # a real difference, so the test can tell them apart
    assert (
        out["operating_point"]["fitted_on"] == "val"
        and out["mean_auroc"] == classification_metrics(labels, probs, FINDINGS)["mean_auroc"]
    )
    assert "operating_point" not in zero_shot_metrics(labels, probs, FINDINGS)  # no val, no tuned threshold


def test_prompt_spec_from_a_cohort_record(model: MedVLP) -> None:
    assert prompt_spec(None) == (None, None) and prompt_spec({"findings": FINDINGS, "prompts": None}) == (None, None)
    record = {
        "findings": FINDINGS,
        "prompts": {
            "synonyms": {"cardiomegaly": ["enlarged cardiac silhouette"]},
            "templates": {"positive": ["The {finding} is seen."], "negative": ["No {finding} is seen."]},
        },
    }
    templates, synonyms = prompt_spec(record)
    assert synonyms == {"cardiomegaly": ["enlarged cardiac silhouette"]}
    assert render_prompts("cardiomegaly", templates, synonyms)["positive"] == [
        "The cardiomegaly is seen.",
        "The enlarged cardiac silhouette is seen.",
    ]
    with_spec = build_prompt_embeddings(model, FINDINGS, templates, synonyms)
    plain = build_prompt_embeddings(model, FINDINGS)
    assert not torch.allclose(with_spec[2], plain[2])  # the record changes the prompts the model is asked with
    torch.testing.assert_close(
        with_spec, embed_prompt_sets(model, [render_prompts(f, templates, synonyms) for f in FINDINGS])
    )
    with pytest.raises(ValueError, match="must be a mapping"):
        prompt_spec({"prompts": ["There is {finding}."]})
    with pytest.raises(ValueError, match="no 'negative' prompt"):
        embed_prompt_sets(model, [{"positive": ["x"], "negative": []}])
