"""What Estuary's ClientApp and Strategy put in Flower messages, spelt once.

A training message carries, as Flower's own FedAvg does, one :class:`~flwr.app.ArrayRecord`
under ``"arrays"`` (the global ``B`` of every adapted module, ``(out, r_max)`` float32, by
module name) and one :class:`~flwr.app.ConfigRecord` under ``"config"``. Estuary's
strategy adds the adapter's identity (``A`` is derived from ``r_max``, seed and epoch, so it
is never sent) and asks for the *update* ``ΔB`` instead of the new weights:

- ``estuary.reply = "delta"``: reply ``ΔB`` zero-padded to ``r_max`` columns, the
  quantity the nested-A rule sums (and secure aggregation could mask);
- no ``estuary.reply`` (any other Flower strategy, e.g. FedAvg): reply ``B + ΔB``, so
  averaging the replies is FedAvg of the adapter and the ClientApp fits a stock strategy.

The reply's :class:`~flwr.app.MetricRecord` under ``"metrics"`` carries ``num-examples``
(the aggregation weight: the client's training bytes, as FedAvg weights by data size) and
``estuary.rank`` (the columns the client trained).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord

from estuary.adapters.lora import AdapterConfig, GlobalAdapter

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
#: Flower's default ``weighted_by_key``: FedAvg and Estuary's strategy weight by it.
WEIGHT_KEY = "num-examples"

REPLY_KEY = "estuary.reply"
REPLY_DELTA = "delta"
R_MAX_KEY = "estuary.r-max"
SEED_KEY = "estuary.adapter-seed"
EPOCH_KEY = "estuary.adapter-epoch"
RANK_KEY = "estuary.rank"
ROUND_KEY = "server-round"  # injected by Flower's FedAvg.configure_train


def b_to_arrays(b: Mapping[str, npt.NDArray[np.floating]]) -> ArrayRecord:
    """Return ``B`` (or ``ΔB``) as an ArrayRecord, one float32 array per module, sorted."""
    return ArrayRecord(
        {name: Array(np.ascontiguousarray(b[name], dtype=np.float32)) for name in sorted(b)}
    )


def arrays_to_b(record: ArrayRecord) -> dict[str, npt.NDArray[np.float32]]:
    """Return the arrays of ``record`` as float32 numpy arrays by module name."""
    return {name: np.asarray(array.numpy(), dtype=np.float32) for name, array in record.items()}


def adapter_config_record(config: AdapterConfig) -> dict[str, int]:
    """Return the entries that let a client rebuild ``A`` (added to the round's config)."""
    return {R_MAX_KEY: config.r_max, SEED_KEY: config.seed, EPOCH_KEY: config.epoch}


def adapter_config_from(config: ConfigRecord, *, r_max: int, seed: int) -> AdapterConfig:
    """Return the adapter config a message names, or ``r_max``/``seed`` at epoch 0.

    The fallback serves stock Flower strategies, which know nothing of ``A``: the client
    then uses the run's own ``r-max`` and ``adapter-seed``, as the server did.

    Raises
    ------
    ValueError
        If an entry is present but not an integer.
    """
    values = {R_MAX_KEY: r_max, SEED_KEY: seed, EPOCH_KEY: 0}
    for key in values:
        if key in config:
            raw = config[key]
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ValueError(f"config: {key} must be an integer, got {raw!r}")
            values[key] = raw
    return AdapterConfig(r_max=values[R_MAX_KEY], seed=values[SEED_KEY], epoch=values[EPOCH_KEY])


def adapter_from(template: GlobalAdapter, record: ArrayRecord) -> GlobalAdapter:
    """Return ``template`` with the ``B`` that ``record`` carries.

    Raises
    ------
    ValueError
        If the module names or shapes differ from the template's (the message names them).
    """
    return template.with_b(arrays_to_b(record))
