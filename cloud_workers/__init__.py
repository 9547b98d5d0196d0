"""Estuary cloud worker groups (full-precision model, pipeline stages)."""
