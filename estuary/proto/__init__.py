"""The Estuary wire protocol: ``.proto`` sources and their committed generated code."""
