"""Estuary cloud worker groups (full-precision model, pipeline stages).

Modules, in dependency order:

- :mod:`cloud_workers.topology` — the validated layout of a group (stages, ranks, layers);
  the only place rank arithmetic happens.
- :mod:`cloud_workers.parallelize` — split a single-device Llama-style model into pipeline
  stages and run them with ``torch.distributed.pipelining`` (gloo on CPU, NCCL on GPU).
- :mod:`cloud_workers.executor` — the executor of the job kinds (evaluate,
  build_artifacts, export_onnx, merge, generate); the job contract itself is
  :mod:`estuary.jobs`.
- :mod:`cloud_workers.group` — the job loop of a group: pull, skip, execute, record once,
  heartbeat, reclaim; and the artifact lane, which runs artifact jobs ahead of the stream.
- :mod:`cloud_workers.worker` — build a group from :class:`WorkerSettings` and serve.
- :mod:`cloud_workers.cli` — ``estuary worker run`` / ``estuary worker generate``.
"""
