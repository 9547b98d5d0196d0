"""The Estuary federation service (coordinator role)."""
