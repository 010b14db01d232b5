"""Triton: configs generated from the spec (``configgen``), the embedded ``tritonserver`` process (``server``) and
the restart policy that keeps it serving (``supervisor``), and the python-backend glue the model files in
``model_repository/`` call (``python_model``, ``triton_glue``, ``flavors``)."""
