"""medseg's server side and offline tools; the client is ``medseg_client`` (its own distribution, ``clients/``).

By where it runs:
- ``ops``: the pure math of one study, in numpy (cpu flavor), torch (cuda flavor) and DALI (preprocessing);
- ``model``: the network, its inference engines (ONNX Runtime, PyTorch), provenance, the in-process pipeline;
- ``serving``: inside and around Triton: config generation, the embedded server, the python-backend glue, flavors;
- ``deploy``: GPU hosts: the MIG planner, compose files, the tenants' gateway;
- ``synth``: synthetic CT studies (phantoms) with their ground truth;
- ``accuracy``: judging the served model against ground truth (metrics, ``medseg evaluate``, ``medseg demo``);
- ``cli``: the server-side ``medseg`` commands; ``paths``: where a checkout keeps its artifacts.
"""
