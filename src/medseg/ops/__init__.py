"""The pure math of one study, run inside Triton's model processes and by the tests directly: the grid and
intensity window (``preprocess``), labels back on the study's grid and findings (``postprocess``, ``lesions``,
``anatomy``), their PyTorch twins for the GPU (``torch_ops``) and the DALI preprocessing graph (``dali_pipeline``)."""
