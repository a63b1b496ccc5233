"""Routing traces: the Parquet format, importers, synthetic traces and the step view the timing
simulator and the engine share. Imports only moesim's shared helpers (errors, safe_write, parallel)."""
