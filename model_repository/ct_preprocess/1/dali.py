"""GPU flavor of ct_preprocess: the DALI backend autoserializes this pipeline when it loads the model."""

from nvidia.dali.plugin.triton import autoserialize

from medseg.dali_pipeline import ct_preprocess


@autoserialize
def pipeline():
    return ct_preprocess(device="gpu")
