"""Studies in, results out, on the client's side: DICOM series and NIfTI read into one ``Study`` (``studies``),
labels written as NIfTI, the DICOM SEG (``seg``) and the preview picture (``preview``)."""
