"""Triton: configs generated from the spec (``configgen``), the embedded ``tritonserver`` and its supervision
(``server``), and the python-backend glue the model files in ``model_repository/`` call (``triton_glue``,
``flavors``)."""
