"""Judging the served model against ground truth: the measures and acceptance bars (``metrics``), ``medseg
evaluate`` on labelled data (``evaluate``) and ``medseg demo`` on one unseen phantom (``demo``)."""
