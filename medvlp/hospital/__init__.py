"""Results a hospital can file: DICOM SR (:mod:`.sr`), STOW-RS to the PACS (:mod:`.stow`), FHIR (:mod:`.fhir`),
and scoring exported ONNX towers with onnxruntime alone (:mod:`.onnx_scorer`)."""
