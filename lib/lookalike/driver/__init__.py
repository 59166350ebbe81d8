"""The driver side of a run: Spark wiring, the incremental ingest, the full re-cluster."""
