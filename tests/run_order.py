"""The order in which the suite's modules start (see :data:`RUN_FIRST`)."""

from __future__ import annotations

#: The modules that take longest, longest first (a full `make test` run's durations,
#: 2026-12-08). They are started first so that the two xdist workers finish together,
#: instead of one running a long module alone at the end while the other idles
#: (longest-first scheduling; the Makefile passes --no-loadscope-reorder so that xdist
#: keeps this order rather than sorting modules by their number of tests). Only the order
#: changes: every other module runs after these, in collection order.
RUN_FIRST = (
    "tests/integration/test_simulate.py",
    "tests/unit/edge_client/test_serving.py",
    "tests/integration/test_worker_jobs.py",
    "tests/integration/test_federation_redis.py",
    "tests/unit/estuary/onnx/test_export_isolation.py",
    "tests/unit/coordinator/test_retention_soak.py",
    "tests/integration/test_flower_simulation.py",
    "tests/integration/test_fleet_ray.py",
    "tests/unit/cloud_workers/test_jobs.py",
    "tests/unit/cloud_workers/test_executor_onnx.py",
    "tests/unit/edge_client/test_agent.py",
    "tests/unit/simulation/test_baselines.py",
    "tests/unit/simulation/fleet/test_estuary_policy.py",
    "tests/unit/cloud_workers/test_pipeline_parity.py",
    "tests/unit/edge_client/test_train.py",
)
