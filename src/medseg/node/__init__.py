"""The PACS node (``medseg node``): DICOM studies in by C-STORE, routed to served models by rules and priority,
SEG + SR + preview back by C-STORE; durable (SQLite) so nothing received is lost and nothing is sent twice."""
