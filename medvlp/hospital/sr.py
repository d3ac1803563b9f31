"""A diagnosis as a DICOM Structured Report: a TID 1500 measurement report in a Comprehensive SR, built with
highdicom from typed parts (never tag by tag).

One measurement group (TID 1501) per finding carries the finding as its finding type, the zero-shot probability as
a measurement (DCM "Probability", unit UCUM "1"), the model as the algorithm identification and the source images;
for a 2D image, the measurement is inferred from a spatial coordinate (SCOORD POINT): the peak of the finding's
grounding map on the source image. A peak is a point the reader can jump to; a SEG of a thresholded map would claim
a boundary the model was never trained to draw, so none is written.

The SR copies the patient and study identifiers of the source instances (highdicom's evidence handling): it goes
back into the hospital's own PACS beside the images, the one output where identifiers belong. Nothing here logs
them.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medvlp.tasks.zeroshot import finding_text

logger = logging.getLogger(__name__)
# highdicom logs the UIDs of the instances it copies identifiers from (at INFO): keep its log to warnings
logging.getLogger("highdicom").setLevel(logging.WARNING)

__all__ = [
    "FINDING_SCHEME",
    "Algorithm",
    "algorithm_of",
    "build_sr",
    "read_source_headers",
    "sr_findings",
]

FINDING_SCHEME = "99MEDVLP"  # local coding scheme of finding names (PS3.16 8.2: "99" prefix for private schemes)
PROBABILITY = codes.DCM.Probability
UNITLESS = Code("1", "UCUM", "no units")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
MAX_CODE_VALUE = 16  # SH
_IMAGE_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_VERSIONS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Algorithm:
    """The model as the SR's algorithm identification (name, version) and the report's manufacturer."""

    name: str
    version: str
    manufacturer: str = "medvlp"

    def identification(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version)


def algorithm_of(model: Any, cohort: dict[str, Any] | None = None) -> Algorithm:
    """The model as an algorithm: ``medvlp <image encoder> (<cohort>)``, version ``<medvlp version>+<weights hash>``.

    The weights hash (12 hex digits of a SHA-256 over the parameters) tells two trainings apart; it is computed
    once per loaded model.
    """
    from medvlp import __version__

    if model not in _VERSIONS:
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        _VERSIONS[model] = f"{__version__}+{h.hexdigest()[:12]}"
    cfg = model.config
    name = f"medvlp {cfg.image_encoder}" + (f" ({cohort['cohort']})" if cohort and cohort.get("cohort") else "")
    return Algorithm(name=name[:64], version=_VERSIONS[model])


def finding_code(finding: str) -> Code:
    """A finding name as a code of :data:`FINDING_SCHEME`: a short stable value, the name as meaning."""
    value = "F" + hashlib.sha256(finding.encode()).hexdigest()[: MAX_CODE_VALUE - 1].upper()
    return Code(value, FINDING_SCHEME, finding_text(finding)[:64])


def read_source_headers(path: Path) -> list[Dataset]:
    """The headers (no pixels) of the DICOM image instances at ``path`` (a file or a series folder), sorted by
    InstanceNumber; empty when none is DICOM (a NIfTI or PNG source has no instance an SR can reference)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            continue
        if all(k in ds for k in _IMAGE_KEYS) and "Rows" in ds:
            out.append(ds)
    return sorted(out, key=lambda d: int(d.get("InstanceNumber") or 0))


def _source_for_point(sources: Sequence[Dataset], point: Sequence[float]) -> tuple[Dataset, list[float]] | None:
    """A 2D peak ``[i, j]`` on a single-frame source image -> (that image, SCOORD ``[column, row]``).

    SCOORD image coordinates put the top left corner of the top left pixel at (0, 0), so a pixel centre is +0.5.
    """
    if len(sources) != 1 or len(point) != 2 or int(sources[0].get("NumberOfFrames") or 1) != 1:
        return None
    ds = sources[0]
    col = float(np.clip(point[0] + 0.5, 0.0, float(ds.Columns)))
    row = float(np.clip(point[1] + 0.5, 0.0, float(ds.Rows)))
    return ds, [col, row]


def build_sr(
    sources: Sequence[Dataset],
    predictions: Sequence[Mapping[str, Any]],
    algorithm: Algorithm,
    *,
    series_number: int = 9901,
    instance_number: int = 1,
) -> hd.sr.ComprehensiveSR:
    """A TID 1500 Comprehensive SR of one diagnosis.

    Args:
        sources: the headers of the diagnosed instances (:func:`read_source_headers`), all of one study.
        predictions: ``{"finding", "probability"[, "peak"]}`` as :class:`medvlp.serve.service.DiagnosisService`
            answers them (``peak``: a stored-image voxel ``[i, j]``; used for 2D single-frame sources).
        algorithm: the model's name and version.
        series_number: the SR's SeriesNumber.
        instance_number: the SR's InstanceNumber.

    Raises:
        ValueError: no source instance, sources from several studies, no prediction, or a probability outside
            [0, 1].
    """
    if not sources:
        raise ValueError("an SR needs the DICOM source instances it reports on; got none (a NIfTI or PNG source?)")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"the sources belong to {len(studies)} studies; an SR reports on one")
    if not predictions:
        raise ValueError("an SR needs at least one prediction")
    algo = algorithm.identification()
    refs = [hd.sr.SourceImageForMeasurement.from_source_image(ds) for ds in sources]
    group_refs = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
    groups = []
    for k, pred in enumerate(predictions):
        p = float(pred["probability"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability of {pred['finding']!r} must lie in [0, 1], got {p}")
        where = _source_for_point(sources, pred["peak"]) if pred.get("peak") is not None else None
        coords = None
        if where is not None:
            ds, point = where
            coords = [
                hd.sr.CoordinatesForMeasurement(
                    graphic_type=hd.sr.GraphicTypeValues.POINT,
                    graphic_data=np.array([point]),
                    source_image=hd.sr.SourceImageForRegion.from_source_image(ds),
                )
            ]
        measurement = hd.sr.Measurement(
            name=PROBABILITY,
            value=round(p, 6),
            unit=UNITLESS,
            algorithm_id=algo,
            referenced_images=None if coords else refs,
            referenced_coordinates=coords,
        )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"finding {k + 1}: {finding_text(str(pred['finding']))}"[:64]
                ),
                finding_type=finding_code(str(pred["finding"])),
                algorithm_id=algo,
                measurements=[measurement],
                source_images=group_refs,
            )
        )
    observer = hd.sr.ObservationContext(
        observer_person_context=None,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name=algorithm.name[:64], manufacturer_name=algorithm.manufacturer
            ),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources),
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        series_description=f"AI results: {algorithm.name}"[:64],
    )
    logger.info("SR built: %d finding(s), %d source instance(s)", len(groups), len(sources))
    return sr


def sr_findings(sr: Dataset) -> dict[str, dict[str, Any]]:
    """Read an SR written by :func:`build_sr` back: ``{finding meaning: {"probability", "point"}}``.

    ``point`` is the SCOORD ``[column, row]`` the probability was inferred from, or None.
    """
    content = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True).content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError("not a TID 1500 measurement report")
    out: dict[str, dict[str, Any]] = {}
    for group in content.get_image_measurement_groups():
        name = str(group.finding_type.meaning) if group.finding_type is not None else ""
        for m in group.get_measurements(name=PROBABILITY):
            coords = m.referenced_coordinates or []
            point = [float(v) for v in coords[0].value.ravel()] if coords else None
            out[name] = {"probability": float(m.value), "point": point}
    return out
