"""Estuary inside a Flower app: a ClientApp and a Strategy on Flower's message API.

- :mod:`simulation.flower.client_app`: trains a nested-rank LoRA adapter on the int8/NF4
  compressed base with Estuary's edge trainer and the node's own data.
- :mod:`simulation.flower.strategy`: aggregates mixed-rank updates exactly (the nested-A
  rule) and writes versions that ``estuary edge infer`` and the PEFT export read.
- :mod:`simulation.flower.server_app`: the ServerApp that runs the strategy.

Runs with ``flwr run`` (``simulation/flower/app`` is a ready Flower app) and with
``flwr.simulation.run_simulation``. Needs the ``flower`` extra; nothing else in Estuary
imports this package.
"""
