"""bench/learning.py: the JSON's headline keys, and choices that never read the test split."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_modules import load_bench

arms = load_bench("learning_arms")
learning = load_bench("learning")


class _Sealed(list):  # type: ignore[type-arg]
    """A test curve that fails the test if anything reads it."""

    def _refuse(self, *args: object) -> None:
        raise AssertionError("a choice read the test split")

    __iter__ = __getitem__ = __len__ = __contains__ = _refuse  # type: ignore[assignment]


def _run(
    arm: str,
    config: dict[str, float],
    *,
    seed: int,
    xs: list[int],
    val: list[float],
    test: list[float],
    extra: dict[str, object] | None = None,
) -> object:
    curve = arms.Curve()
    for x, v, t in zip(xs, val, test, strict=True):
        curve.add(x, x * 8, v, t)
    return arms.Run(arm, config, seed, curve, 1.0, {"train_steps": 10, **(extra or {})})


def test_choices_read_validation_only_even_when_test_disagrees() -> None:
    # Validation prefers lr 0.01 for every arm; a sealed test split would raise if read.
    fed = [
        _run(
            "all_rank_16",
            {"lr": lr, "server_lr": 1.0, "momentum": 0.0},
            seed=0,
            xs=[0, 4],
            val=[3.0, v],
            test=[3.0, 0.0],
        )
        for lr, v in ((0.003, 2.9), (0.01, 2.7), (0.03, 2.8))
    ]
    central = [
        _run("centralized", {"lr": lr}, seed=0, xs=[0, 40], val=[3.0, v], test=[3.0, 0.0])
        for lr, v in ((0.003, 2.9), (0.01, 2.6))
    ]
    local = [
        _run(
            "local_only",
            {"lr": lr},
            seed=0,
            xs=[0, 20],
            val=[3.0, 2.9],
            test=[3.0, 2.9],
            extra={"val": v, "test": 0.0},
        )
        for lr, v in ((0.01, 2.8), (0.03, 2.85))
    ]
    for run in [*fed, *central]:
        run.curve.test = _Sealed(run.curve.test)

    chosen = learning.choose({"all_rank_16": fed, "centralized": central, "local_only": local})

    assert chosen["all_rank_16"].config["lr"] == 0.01
    assert chosen["centralized"].config["lr"] == 0.01
    assert chosen["local_only"].config["lr"] == 0.01


def test_select_best_follows_validation_not_test() -> None:
    good_val = _run("x", {"lr": 1.0}, seed=0, xs=[0, 1], val=[3.0, 2.0], test=[3.0, 2.9])
    good_test = _run("x", {"lr": 2.0}, seed=0, xs=[0, 1], val=[3.0, 2.5], test=[3.0, 1.0])

    assert arms.select_best([good_test, good_val]) is good_val


def _settings(tmp_path: Path) -> object:
    return learning.Settings(
        base_dir=str(tmp_path),
        rounds=64,
        local_steps=5,  # the arithmetic below: 64 rounds are 320 sequential steps
        seeds=3,
        eval_every=16,
        variants=("all_rank_16", "mixed_ranks"),
    )


def test_report_has_the_headline_keys_and_arithmetic(tmp_path: Path) -> None:
    # Prepare: local-only best 3.0 (test), ceiling 2.0; federated falls 0.05 per point
    # and crosses 3.0 at round 16; at round 64 it is at 2.2 -> gap closed 0.8.
    settings = _settings(tmp_path)
    fed_x = settings.fed_points  # [0, 1, 2, 4, 8, 16, 32, 48, 64]
    fed_test = [3.4, 3.3, 3.2, 3.1, 3.05, 2.9, 2.6, 2.4, 2.2]
    finals: dict[str, list[object]] = {}
    tuning: dict[str, list[object]] = {}
    for name in settings.variants:
        finals[name] = [
            _run(
                name,
                {"lr": 0.01, "server_lr": 1.0, "momentum": 0.0},
                seed=s,
                xs=fed_x,
                val=fed_test,
                test=fed_test,
            )
            for s in range(3)
        ]
        tuning[name] = finals[name][:1]
    finals["local_only"] = [
        _run(
            "local_only",
            {"lr": 0.01},
            seed=s,
            xs=settings.local_points,
            val=[3.4] * len(fed_x),
            test=[3.4] * len(fed_x),
            extra={"val": 3.0, "test": 3.0, "steps": {"json": 20}},
        )
        for s in range(3)
    ]
    finals["centralized"] = [
        _run(
            "centralized",
            {"lr": 0.01},
            seed=s,
            xs=[0, 320, 640, 960],
            val=[3.4, 2.5, 2.0, 2.1],
            test=[3.4, 2.5, 2.0, 1.0],
        )
        for s in range(3)
    ]
    tuning["local_only"], tuning["centralized"] = finals["local_only"], finals["centralized"]
    chosen = {k: v[0] for k, v in finals.items()}

    result = learning.report(settings, tuning, chosen, finals)

    for key in ("curves", "local_only_best", "centralized_ceiling", "variants"):
        assert key in result
    assert set(result["curves"]) == {"local_only", "centralized", "all_rank_16", "mixed_ranks"}
    for name in settings.variants:
        v = result["variants"][name]
        for key in (
            "curves",
            "local_only_best",
            "centralized_ceiling",
            "rounds_to_beat_local_only",
            "gap_closed_at_64_rounds",
        ):
            assert key in v, key
        assert v["rounds_to_beat_local_only"] == 16
        assert v["gap_closed_at_64_rounds"]["mean"] == pytest.approx(0.8)
        # The ceiling is the test score at the best *validation* point (2.0), not the
        # lowest test score (1.0).
        assert v["centralized_ceiling"]["mean"] == pytest.approx(2.0)
        assert v["centralized_at_final_round"]["equal_sequential_steps"]["mean"] == 2.5
        assert len(v["curves"]["federated"]["test_mean"]) == len(fed_x)


def test_splits_are_disjoint_and_test_has_more_than_16_windows() -> None:
    splits = arms.make_splits(
        ("json", "http"), max_train_bytes=8192, val_windows=8, test_windows=17
    )
    for client, test_client in zip(splits.clients, splits.test_clients, strict=True):
        test_chunks = [
            test_client.heldout[i : i + 1024]
            for i in range(0, len(test_client.heldout) - 1023, 1024)
        ]
        val_chunks = [
            client.heldout[i : i + 1024] for i in range(0, len(client.heldout) - 1023, 1024)
        ]
        assert test_chunks and val_chunks
        assert len(client.train) == 8192
        for chunk in test_chunks:
            assert chunk not in client.train and chunk not in client.heldout
        for chunk in val_chunks:
            assert chunk not in client.train
    assert all(w.shape[0] == 17 for w in splits.test.windows.values())
