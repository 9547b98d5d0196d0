"""``estuary simulate``: a whole federation on one machine, measured and reported."""
