"""Stage 1, ingest: read, validate and normalise feedback logs, tokenize and split (ingest),
and the UDM density-ratio weights (udm, udm_stage)."""
