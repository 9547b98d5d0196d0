"""Estuary's Flower ServerApp: the nested-LoRA strategy over the full-precision base.

The server loads the full-precision base (a Hugging Face directory, or a built-in preset,
built identically in every process), derives the round-0 adapter (zero ``B``, ``A`` from
the seed), runs :class:`~simulation.flower.strategy.NestedLoRA` for ``num-server-rounds``
rounds and writes every version under ``out-dir`` (:mod:`simulation.flower.versions`).

``flwr run`` loads the module-level :data:`app` and reads the run config;
``flwr.simulation.run_simulation`` takes :func:`make_server_app` with
:class:`~simulation.flower.settings.FlowerSettings`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from estuary.adapters.lora import AdapterConfig, GlobalAdapter
from simulation.flower.settings import FlowerSettings
from simulation.flower.strategy import NestedLoRA, RoundAggregate
from simulation.flower.versions import VersionWriter

logger = logging.getLogger(__name__)

#: Server-side evaluation, as Flower's ``Strategy.start`` takes it: (round, arrays) → metrics.
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def run_server(
    grid: Grid,
    settings: FlowerSettings,
    *,
    on_aggregate: Callable[[RoundAggregate], None] | None = None,
    evaluate_fn: EvaluateFn | None = None,
) -> Result:
    """Run the whole federation on ``grid``; return Flower's result of the strategy."""
    from estuary.config.models import ModelSettings
    from estuary.model.loading import load_base

    model = (
        ModelSettings(path=settings.base)
        if settings.base is not None
        else ModelSettings(preset=settings.preset)
    )
    base = load_base(model)
    adapter = GlobalAdapter.for_model(
        base, AdapterConfig(r_max=settings.r_max, seed=settings.adapter_seed)
    )
    writer = VersionWriter(
        settings.out_dir,
        base=base if settings.write_model != "never" else None,
        write_model=settings.write_model,
        final_version=settings.num_server_rounds,
        base_name=str(settings.base) if settings.base is not None else None,
    )
    strategy = NestedLoRA(
        adapter,
        server_lr=settings.server_lr,
        writer=writer,
        on_aggregate=on_aggregate,
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_train_nodes,
    )
    return strategy.start(
        grid,
        initial_arrays=strategy.initial_arrays(),
        num_rounds=settings.num_server_rounds,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )


def make_server_app(
    settings: FlowerSettings | None = None,
    *,
    on_aggregate: Callable[[RoundAggregate], None] | None = None,
    evaluate_fn: EvaluateFn | None = None,
) -> ServerApp:
    """Return Estuary's ServerApp.

    Parameters
    ----------
    settings
        The run's settings (for ``flwr.simulation.run_simulation``, which passes no run
        config); ``None`` reads them from ``context.run_config`` (``flwr run``).
    on_aggregate
        Called after each round with what was aggregated (see
        :class:`~simulation.flower.strategy.RoundAggregate`).
    evaluate_fn
        Optional server-side evaluation after each round.
    """
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        resolved = settings or FlowerSettings.from_run_config(context.run_config)
        run_server(grid, resolved, on_aggregate=on_aggregate, evaluate_fn=evaluate_fn)

    return app


#: The ServerApp ``flwr run`` loads (``serverapp = "simulation.flower.server_app:app"``).
app = make_server_app()

__all__ = ["EvaluateFn", "app", "make_server_app", "run_server"]
