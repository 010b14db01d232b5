"""GPU hosts: MIG layouts planned and checked (``mig``), one Triton service per MIG instance (``mig_compose``) and
the tenants' nginx gateway (``gateway``)."""
