"""The arms of the zero-shot ablation (:mod:`bench_ablation`): config overrides on top of the demo config.

Each arm's overrides start with :data:`PIN`, which holds the demo config's stage-2 methods at the values of the
`report` baseline (report-level alignment only, the tower's mean pool, `sentence` prompts), so an arm is the same
model whatever the demo config turns on; an arm then turns its own methods on.
"""

from __future__ import annotations

from typing import Any

#: The `report` baseline's methods, pinned whatever the demo config says: no twin, sentence or box term, no mirrored
#: pairs, the text tower at a tenth of the rate, the tower's heads at its rate, the tower's mean pool, `sentence`
#: prompts.
PIN = [
    "stages.stage2-align.prompt_forms=[sentence]",
    "stages.stage2-align.twin_weight=0.0",
    "stages.stage2-align.sentence_weight=0.0",
    "stages.stage2-align.hard_negatives=[]",
    "stages.stage2-align.box_weight=0.0",
    "stages.stage2-align.twin_sentence_weight=0.0",
    "stages.stage2-align.twin_sentence_text_only=false",
    "stages.stage2-align.twin_sentence_kinds=null",
    "stages.stage2-align.twin_absence=false",
    "stages.stage2-align.twin_sentence_balance=false",
    "stages.stage2-align.twin_sides=sentence",
    "stages.stage2-align.mirror=0.0",
    "stages.stage2-align.text_lr_scale=0.1",
    "stages.stage2-align.head_lr_scale=null",
    "model.image_encoder_args.global_pool=avg",
    "model.image_encoder_args.laterality=false",
    "model.text_num_layers=3",
    "data.augment_interpolation=bilinear",
    "stages.stage2-align.side_edit=false",
    "stages.stage2-align.side_edit_texts=sentences",
    "stages.stage2-align.side_check=false",
    "stages.stage2-align.image_refit=null",
    "stages.stage2-align.image_refit_cell=null",
]

#: Per kind, what the demo config turns on beyond :data:`PIN`'s methods, pinned off as well (a kind's own switch: only
#: the 3D ResNet takes the spot statistics), so `report` stays the baseline; :func:`arm_overrides` puts it first.
PIN_KIND: dict[str, list[str]] = {"cxr": [], "ct": ["model.image_encoder_args.blobs=false"]}

#: The arms: config overrides on top of the demo config (the `report` arm is the demo config with sentence prompts).
ARMS: dict[str, list[str]] = {
    "report": [],
    "sentence": ["stages.stage2-align.sentence_weight=1.0"],
    "sentence_hard": [
        "stages.stage2-align.sentence_weight=1.0",
        "stages.stage2-align.hard_negatives=[negation,laterality]",
    ],
    "sentence_hard_affirm": [
        "stages.stage2-align.sentence_weight=1.0",
        "stages.stage2-align.hard_negatives=[negation,laterality,affirmation]",
    ],
    "select": ["stages.stage2-align.select_metric=val/zero_shot_auroc"],
    "twin": [  # each image against its report with one sentence flipped: the text direction, report level
        "stages.stage2-align.twin_weight=1.0",
        "stages.stage2-align.hard_negatives=[negation,laterality,affirmation]",
    ],
    "text": ["stages.stage2-align.text_lr_scale=0.5"],  # the text tower at half the rate alone, no twins
    "twin_text": [  # the twin term with the text tower at half the rate instead of a tenth
        "stages.stage2-align.twin_weight=1.0",
        "stages.stage2-align.hard_negatives=[negation,laterality,affirmation]",
        "stages.stage2-align.text_lr_scale=0.5",
    ],
    # studies with the same finding labels are not pushed apart (label-aware soft targets instead of same-report)
    "labels": ["stages.stage2-align.false_negatives=labels"],
    # the image side (3D ResNet towers): the embedding is the maximum over the last stage's tokens, not their mean
    **{f"pool_{p}": [f"model.image_encoder_args.global_pool={p}"] for p in ("max", "avgmax")},
    # supervised grounding: one annotated phrase per training study must point into its boxes over the image tokens
    "box": ["stages.stage2-align.box_weight=1.0"],
    "box_light": ["stages.stage2-align.box_weight=0.1"],  # the same at a tenth of the weight
    "box_light_image": ["stages.stage2-align.box_weight=0.1", "stages.stage2-align.box_text_grad=false"],
    # the 3D ResNet's embedding plus fixed bright/dark spot margins of the input per body half (medvlp.models.blobs)
    "blobs": ["model.image_encoder_args.blobs=true"],
    # ... and the levels of spots away from the window's ceiling (soft tissue brighter than the organs: masses)
    "blobs_levels": ["model.image_encoder_args.blobs=[margins,levels]"],
    # ... trained on the cached images as they are (no affine, intensity or noise jitter, which the statistics see)
    "blobs_noaug": ["model.image_encoder_args.blobs=true", "data.augment=false"],
    # stage 2 for 400 steps instead of the 3D demo's 150 (measured in 3D: 876 s of training, past the demo's 15 minutes)
    "long": ["stages.stage2-align.steps=400", "stages.stage2-align.checkpoint_every=100"],
}
#: Arms that differ from a base arm only after training (the prompt form is chosen on val with the calibration):
#: they start from a copy of the base arm's finished run, which training resumes (nothing to train) and recalibrates.
#: The other arms keep the `sentence` form whatever the demo config chooses, so `report` stays the baseline.
FORMS = "stages.stage2-align.prompt_forms=[sentence,report,report_section]"
#: ... and with the sentences mined from the training reports (label-free), alone and framed, as two more.
MINED = "stages.stage2-align.prompt_forms=[sentence,report,report_section,mined,mined_report_section]"
#: ... and with the training reports' mean embeddings per finding (label-free report prototypes) as one more.
MINED_REPORTS = MINED.replace("mined_report_section]", "mined_report_section,mined_reports]")
ARMS = {arm: [*PIN, *overrides] for arm, overrides in ARMS.items()}
DERIVED = {
    "forms": "report",
    "twin_text_forms": "twin_text",
    "labels_forms": "labels",
    "mined": "report",
    "mined_reports": "report",
}
#: Prompts in the cohort's words (a cohort YAML's ``prompts: synonyms:``), which act after training only (training
#: reads no prompt; validation during training only logs them): the `synonyms*` arms are the `report` run with these
#: written into its model folder's cohort record, then recalibrated, as if the cohort YAML had held them. One generic
#: list per kind, the names a radiologist would add, the same for every style (none read from a style's phrasing).
SYNONYMS: dict[str, dict[str, list[str]]] = {
    "cxr": {
        "cardiomegaly": ["enlarged heart", "enlarged cardiac silhouette"],
        "pleural_effusion": ["effusion", "pleural fluid"],
        "lung_nodule": ["pulmonary nodule", "nodule"],
        "pneumothorax": ["collapsed lung", "air in the pleural space"],
    },
    "ct": {
        "renal_mass": ["kidney mass", "renal tumor"],
        "kidney_stone": ["renal calculus", "nephrolithiasis"],
        "hepatic_lesion": ["liver lesion", "liver mass"],
        "ascites": ["free fluid", "peritoneal fluid"],
    },
}
DERIVED |= {"synonyms": "report", "synonyms_mined_reports": "report", "box_light_mined_reports": "box_light"}
WITH_SYNONYMS = ("synonyms", "synonyms_mined_reports")
SENTENCE = PIN[0]
FORMS_OF = {
    "mined": MINED,
    "mined_reports": MINED_REPORTS,
    "synonyms": SENTENCE,
    "synonyms_mined_reports": MINED_REPORTS,
    "box_light_mined_reports": MINED_REPORTS,
    "mined_reports_agree": MINED_REPORTS,
}
DERIVED["mined_reports_agree"] = "report"  # mined_reports, a sentence's finding read by the tower and a general encoder


def with_mined_reports(base: str) -> str:
    """Adds ``<base>_mined_reports``: the finished ``base`` run with the 2D demo's prompt forms, chosen on val."""
    arm = f"{base}_mined_reports"
    DERIVED[arm], FORMS_OF[arm] = base, MINED_REPORTS
    ARMS[arm] = [*ARMS[base], MINED_REPORTS]
    return arm


#: ... with the statistics' map (a head that starts at zero) at 10 times the rate of the tower (`head_lr_scale`): at
#: the tower's rate its output stays a tenth of the tower's embedding after 150 steps and is drowned in the sum.
ARMS["blobs_head10"] = [*ARMS["blobs"], "stages.stage2-align.head_lr_scale=10.0"]
ARMS["blobs_levels_head10"] = [*ARMS["blobs_levels"], "stages.stage2-align.head_lr_scale=10.0"]
ARMS["blobs_levels_head3"] = [*ARMS["blobs_levels"], "stages.stage2-align.head_lr_scale=3.0"]  # between the two
for _base in ("blobs", "blobs_levels", "blobs_noaug", "blobs_head10", "blobs_levels_head10", "blobs_levels_head3"):
    with_mined_reports(_base)
ARMS |= {arm: [*ARMS[base], FORMS_OF.get(arm, FORMS)] for arm, base in DERIVED.items()}
ARMS["mined_reports_agree"].append("stages.stage2-align.mining_topic_readers=[model,general]")
#: Stage 2 alone (no text MLM first) with the demo's prompt forms: compared with `mined_reports`, the demo config.
ARMS["align_only"] = [*ARMS["report"], "stages.stage1-text.enabled=false", MINED_REPORTS]
#: The image tower ends in a positional attention pool (`global_pool: attn`) instead of the mean: an embedding that
#: can say left from right (the laterality half of the robustness suite); compared with `mined_reports`.
ARMS["attn_pool"] = [*ARMS["report"], "model.image_encoder_args.global_pool=attn", MINED_REPORTS]
#: ... as a residual on the mean that starts at zero (`global_pool: avgattn`), grounding's tokens left as they were.
ARMS["avgattn_pool"] = [*ARMS["report"], "model.image_encoder_args.global_pool=avgattn", MINED_REPORTS]
#: Pairs mirrored across the left-right axis with "left" and "right" swapped in the report (half of them); with the
#: twin term too (`mirror_twin_text`), so that the text tells the sides apart that the mirrored images show.
ARMS["mirror"] = [*ARMS["report"], "stages.stage2-align.mirror=0.5", MINED_REPORTS]
ARMS["mirror_avgattn"] = [*ARMS["mirror"], "model.image_encoder_args.global_pool=avgattn"]
ARMS["mirror_report"] = [*ARMS["report"], "stages.stage2-align.mirror=0.5"]  # the `report` config (3D)
ARMS["mirror_twin_text"] = [*ARMS["twin_text"], "stages.stage2-align.mirror=0.5", MINED_REPORTS]
#: The residual pool with the twin term and the faster text tower (`twin_text`): an image side that can carry the
#: side, and a text tower taught that "left" is not "right" and "no" is not "yes".
ARMS["twin_text_attn"] = [*ARMS["twin_text"], "model.image_encoder_args.global_pool=avgattn", MINED_REPORTS]
#: ... with the text tower at the demo's tenth of the rate (`twin`), and with the light phrase-box term on top.
ARMS["twin_attn"] = [*ARMS["twin"], "model.image_encoder_args.global_pool=avgattn", MINED_REPORTS]
ARMS["twin_attn_box"] = [*ARMS["twin_attn"], "stages.stage2-align.box_weight=0.1"]
#: ... with size/severity twins as a fourth rule ("small" -> "large", "8 mm" -> "32 mm").
ARMS["twin_attn_box_severity"] = [
    *ARMS["twin_attn_box"],
    "stages.stage2-align.hard_negatives=[negation,laterality,affirmation,severity]",
]
#: ... with the laterality head (`laterality: true`): the feature map's first moment across the patient's left-right
#: axis, a zero-initialised residual on the embedding, so that the side of a finding is linear in it.
ARMS["twin_attn_box_lat"] = [*ARMS["twin_attn_box"], "model.image_encoder_args.laterality=true"]
#: ... with the sentence twin term (`twin_sentence_weight: 1`): the sentence flipped for the report's twin, alone,
#: against its twin alone, the robustness suite's own form (the report twin trains whole reports only).
ARMS["twin_attn_box_sent"] = [*ARMS["twin_attn_box"], "stages.stage2-align.twin_sentence_weight=1.0"]
ARMS["twin_attn_box_sent03"] = [*ARMS["twin_attn_box"], "stages.stage2-align.twin_sentence_weight=0.3"]
#: ... with absence twins (`twin_absence: true`): a training phrase of a finding the study is labelled without, and
#: its negation, enter the draw (the report with the phrase added must lose; with the sentence twin term the negated
#: phrase alone must win): the negated sentences the suite's absence cases ask for, which the twins never make winners
ARMS["twin_attn_box_absence"] = [*ARMS["twin_attn_box"], "stages.stage2-align.twin_absence=true"]
ARMS["twin_attn_box_sent_absence"] = [*ARMS["twin_attn_box_sent"], "stages.stage2-align.twin_absence=true"]
ARMS["twin_attn_box_sent03_absence"] = [*ARMS["twin_attn_box_sent03"], "stages.stage2-align.twin_absence=true"]
#: ... with that term moving the text side only (`twin_sentence_text_only`): the image embedding, which holds the side
#: already (side probe 0.82 to 0.98), enters it detached, so the term cannot pull images toward single sentences.
ARMS["twin_attn_box_sent_text"] = [*ARMS["twin_attn_box_sent"], "stages.stage2-align.twin_sentence_text_only=true"]
#: ... with that term on the side-swapped pairs alone (`twin_sentence_kinds: [laterality]`): negation is at 0.87 to 0.97
#: with the report twin already, and the negated and affirmed sentence pairs move the prompts the zero-shot reads.
ARMS["twin_attn_box_sent_lat"] = [*ARMS["twin_attn_box_sent"], "stages.stage2-align.twin_sentence_kinds=[laterality]"]
#: ... with all 6 layers of the bundled text tower, not the first 3 (`model.text_num_layers: 6`): untrained, it tells
#: "left pneumothorax" from "right pneumothorax" at cosine 0.926 against 0.983, a negation at 0.754 against 0.928.
ARMS["twin_attn_box_text6"] = [*ARMS["twin_attn_box"], "model.text_num_layers=6"]
#: ... and with the sentence twin term on the text side (`twin_attn_box_sent_text`): six layers lifted laterality and
#: retrieval with no term of their own, the text-side term lifted negation to 1.0; the question is whether the deeper
#: text side carries the term without the zero-shot cost it had on three layers.
ARMS["twin_attn_box_text6_sent_text"] = [
    *ARMS["twin_attn_box_text6"],
    "stages.stage2-align.twin_sentence_weight=1.0",
    "stages.stage2-align.twin_sentence_text_only=true",
]
#: ... with consistent laterality twins (`twin_sides: report`): every side of the report swapped, so the twin does not
#: contradict itself (a one-sentence swap did in about 3 of 4 reports: a text-only cue the tower can learn).
ARMS["twin_attn_box_sides"] = [*ARMS["twin_attn_box"], "stages.stage2-align.twin_sides=report"]
#: ... both: six text layers with consistent laterality twins, the two switches that each raised laterality on all
#: three styles without a term of their own (and without more texts per step).
ARMS["twin_attn_box_text6_sides"] = [*ARMS["twin_attn_box_text6"], "stages.stage2-align.twin_sides=report"]
#: ... with the phrase-box term at 0.3 instead of 0.1: six text layers lowered grounding mIoU on every style.
ARMS["twin_attn_box_text6_sides_box03"] = [*ARMS["twin_attn_box_text6_sides"], "stages.stage2-align.box_weight=0.3"]
#: The 2D demo's finished run with the side edit fitted after training (`side_edit: true`, medvlp.models.side_edit): the
#: text embedding of a sentence that names a side moved along the image embedding's side direction, then recalibrated.
#: `_side` edits a text of one sentence only (the reports keep their embeddings), `_side_all` every text.
ARMS["twin_attn_box_side"] = [*ARMS["twin_attn_box"], "stages.stage2-align.side_edit=true"]
ARMS["twin_attn_box_side_all"] = [*ARMS["twin_attn_box_side"], "stages.stage2-align.side_edit_texts=all"]
DERIVED |= {"twin_attn_box_side": "twin_attn_box", "twin_attn_box_side_all": "twin_attn_box"}
#: ... with the side check after the edit (`side_check: true`, medvlp.models.side_check): a one-sided sentence's pair
#: score reads on which half of the image tokens its finding lights up; `_check` is the check without the edit.
ARMS["twin_attn_box_side_check"] = [*ARMS["twin_attn_box_side"], "stages.stage2-align.side_check=true"]
ARMS["twin_attn_box_check"] = [*ARMS["twin_attn_box"], "stages.stage2-align.side_check=true"]
DERIVED |= {"twin_attn_box_side_check": "twin_attn_box", "twin_attn_box_check": "twin_attn_box"}


def with_side_check(base: str) -> str:
    """Adds ``<base>_side_check``: the finished ``base`` run with the side edit and check fitted as on the demo's."""
    arm = f"{base}_side_check"
    DERIVED[arm] = base
    ARMS[arm] = [*ARMS[base], "stages.stage2-align.side_edit=true", "stages.stage2-align.side_check=true"]
    return arm


def arm_with_side_check(arm: str, base: str, *overrides: str) -> str:
    """Adds ``arm`` (``base`` with ``overrides``) and its ``<arm>_side_check`` (:func:`with_side_check`)."""
    ARMS[arm] = [*ARMS[base], *overrides]
    return with_side_check(arm)


#: ... the absence twins with the sentence twin term at 0.3 (`twin_attn_box_sent03_absence`), with the side check
with_side_check("twin_attn_box_sent03_absence")
#: ... with the sentence twin term's two ways of "no" weighed equally (`twin_sentence_balance`): in the draw the pairs
#: whose denial must win (affirmed twins of the reports' denials, the absence pairs) outnumber the negated twins about
#: 4 to 1, and without the check the suite's negation fell where its absence rose (style 2: 0.958 -> 0.750).
arm_with_side_check(
    "twin_attn_box_sent03_absence_bal", "twin_attn_box_sent03_absence", "stages.stage2-align.twin_sentence_balance=true"
)
#: ... with the side-swapped pairs out of the sentence twin term (`twin_sentence_kinds: [negation, affirmation,
#: absence]`): the side check reads laterality off the image tokens, and every sentence twin term with side pairs cost
#: R@10 on style 2 (0.709 -> 0.58 to 0.65).
arm_with_side_check(
    "twin_attn_box_sent03_absence_bal_polar",
    "twin_attn_box_sent03_absence_bal",
    "stages.stage2-align.twin_sentence_kinds=[negation,affirmation,absence]",
)
#: ... with that term moving the text side only (`twin_sentence_text_only`): the polar term raised zero-shot and
#: negation both ways on three styles but lowered grounding on three and R@10 on two; is the cost its pull on the
#: image side?
arm_with_side_check(
    "twin_attn_box_sent03_absence_bal_polar_text",
    "twin_attn_box_sent03_absence_bal_polar",
    "stages.stage2-align.twin_sentence_text_only=true",
)
#: ... at a third of the weight (0.1): the text-side term kept its gains in zero-shot and the worst finding but cost
#: R@10 and grounding on three styles; does a lighter term keep the gains without the cost?
arm_with_side_check(
    "twin_attn_box_sent01_absence_bal_polar_text",
    "twin_attn_box_sent03_absence_bal_polar_text",
    "stages.stage2-align.twin_sentence_weight=0.1",
)
#: The phrase-box terms on finer tokens (3D ResNet): a feature pyramid to stage 3 or 2 (`token_stage`), tokens of 48
#: or 24 mm at the demo's 6 mm voxels instead of 96, so that a lesion can have a token of its own (issue 12 point 4).
FPN = {f"{box}_fpn{s}": (box, s) for box in ("box", "box_light", "box_light_image") for s in (3, 2)}
ARMS |= {arm: [*ARMS[box], f"model.image_encoder_args.token_stage={s}"] for arm, (box, s) in FPN.items()}
#: The spot statistics with the phrase-box term on stage-2 tokens (the two 3D switches that each raised the probe),
#: and the same run with the 3D demo's prompt forms chosen on val: compared with `blobs` and `blobs_mined_reports`.
ARMS["blobs_box_light_fpn2"] = [*ARMS["box_light_fpn2"], "model.image_encoder_args.blobs=true"]
with_mined_reports("blobs_box_light_fpn2")
#: The 3D demo (`blobs`) with the augmentation's affine resampling at the nearest voxel, not trilinear
#: (`data.augment_interpolation: nearest`): trilinear resampling lowers a one-voxel stone's peak, and the spot
#: statistics and the tower see the fainter stone in most training samples but the sharp one at test.
ARMS["blobs_nearest"] = [*ARMS["blobs"], "data.augment_interpolation=nearest"]
with_mined_reports("blobs_nearest")
#: The 3D demo with all 6 layers of the bundled text tower (`model.text_num_layers: 6`), as `twin_attn_box_text6`.
ARMS["blobs_text6"] = [*ARMS["blobs"], "model.text_num_layers=6"]
with_mined_reports("blobs_text6")
#: The 3D demo with the spot margins also as maps into the ResNet's stem (`spot_maps: true`,
#: medvlp.models.blobs.SpotMaps), so the tower can learn where a spot is a finding.
ARMS["blobs_spots"] = [*ARMS["blobs"], "model.image_encoder_args.spot_maps=true"]
with_mined_reports("blobs_spots")
#: The 3D demo with drop path on the tower's pooled embedding (`tower_drop: 0.5`): half the training samples are
#: aligned through the spot statistics alone, which a tower that memorises the series otherwise drowns.
ARMS["blobs_drop"] = [*ARMS["blobs"], "model.image_encoder_args.tower_drop=0.5"]
with_mined_reports("blobs_drop")
#: The 3D demo with the spot statistics' branch also aligned alone (`branch_weight: 1.0`): the statistics' map must
#: match each report by itself, against the reports held fixed.
ARMS["blobs_branch"] = [*ARMS["blobs"], "stages.stage2-align.branch_weight=1.0"]
with_mined_reports("blobs_branch")
#: The 3D demo with the spots' contrast to noise beside the margins (`blobs: [margins, contrast]`,
#: medvlp.models.blobs.spot_contrast): faint dark and bright spots in a homogeneous organ (hepatic lesions).
ARMS["blobs_contrast"] = [*ARMS["blobs"], "model.image_encoder_args.blobs=[margins,contrast]"]
with_mined_reports("blobs_contrast")
#: The 3D demo scored, selected and written as a moving average of its stage-2 weights (`ema_decay`, medvlp.train.ema;
#: the decay warmed up as timm's, so over 150 steps it is 0.80 to 0.96 and the cap of 0.999 is never reached): on 336
#: pairs the weights after one step carry its batch, and the val contrastive loss climbs after step 50 or 100.
ARMS["blobs_ema"] = [*ARMS["blobs"], "stages.stage2-align.ema_decay=0.999"]
with_mined_reports("blobs_ema")
#: The image refit after training (`image_refit`, medvlp.models.image_refit): the global image embedding mapped onto
#: the report embeddings in closed form from the trained embedding and the spot statistics (margins and contrasts to
#: noise), a ridge on the training pairs chosen on val, no labels; on finished runs, with the 3D demo's prompt forms.
#: `_refit` reads the tower's own kinds (margins and contrasts), `_refitall` every kind (the spot levels too, which
#: hold the renal masses but lowered zero-shot when the tower's map learned them in stage 2).
REFITS = {"refit": "[margins,contrast]", "refitall": "[margins,levels,contrast]"}
for _base in ("blobs", "blobs_contrast"):
    for _name, _kinds in REFITS.items():
        ARMS[f"{_base}_{_name}_mined_reports"] = [
            *ARMS[f"{_base}_mined_reports"],
            f"stages.stage2-align.image_refit={_kinds}",
        ]
        DERIVED[f"{_base}_{_name}_mined_reports"] = _base
#: The refit's map on the tokens too (`image_refit_cell`): cells of 4 voxels (16 x 16 x 8 at the demo's 64 x 64 x 32),
#: each from the cell's spot statistics standardised by that cell's training mean and scale; grounding reads them.
ARMS["blobs_contrast_refitall_cells_mined_reports"] = [
    *ARMS["blobs_contrast_refitall_mined_reports"],
    "stages.stage2-align.image_refit_cell=4",
]
DERIVED["blobs_contrast_refitall_cells_mined_reports"] = "blobs_contrast"
#: The 3D demo's finished run with the side edit (as `twin_attn_box_side` in 2D): left and right kidneys.
ARMS["blobs_mined_reports_side"] = [*ARMS["blobs_mined_reports"], "stages.stage2-align.side_edit=true"]
DERIVED["blobs_mined_reports_side"] = "blobs_mined_reports"
ARMS["blobs_mined_reports_check"] = [*ARMS["blobs_mined_reports"], "stages.stage2-align.side_check=true"]
DERIVED["blobs_mined_reports_check"] = "blobs_mined_reports"
#: Arms that train the `report` arm's config on a cache of their own, built with these preprocess settings over the
#: cohort YAML's: `auto_resolution` lets `cohort build` choose spacing and size from the cohort (the smallest box,
#: within the same voxel budget) after cropping to the body (issue 12 point 1); compared with `report`.
PREPROCESS: dict[str, dict[str, Any]] = {"auto_resolution": {"size": "auto", "spacing": None, "crop_foreground": True}}
ARMS |= {arm: ARMS["report"] for arm in PREPROCESS}
#: The 2D demo's arms on radiographs cached at 160 x 160 instead of 128 x 128 (a pneumothorax's rim is 4 to 6 pixels
#: wide at 128, and it is the worst finding in all 9 runs of the demo over three seeds and three styles).
PREPROCESS["twin_attn_box_160"], ARMS["twin_attn_box_160"] = {"size": [160, 160]}, list(ARMS["twin_attn_box"])
ARMS["twin_attn_box_160_side_check"] = list(ARMS["twin_attn_box_side_check"])
DERIVED["twin_attn_box_160_side_check"] = "twin_attn_box_160"


def cache_arm(arm: str) -> str | None:
    """The :data:`PREPROCESS` arm whose cache ``arm`` reads: its own, or a derived arm's base's (it evaluates the
    base's run, so it must read the images that run was trained on); None: the style's own cache."""
    source = DERIVED.get(arm, arm) if arm not in PREPROCESS else arm
    return source if source in PREPROCESS else None


def arm_overrides(kind: str, arm: str) -> list[str]:
    """The config overrides of ``arm`` for a cohort ``kind`` (``cxr`` or ``ct``): the kind's pins, then the arm's."""
    return [*PIN_KIND[kind], *ARMS[arm]]
