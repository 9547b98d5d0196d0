"""A compare-and-set racer, run as a separate process (or called in a thread).

``python cas_worker.py URL PREFIX TAG ROUNDS INCREMENTS`` opens the store,
waits for the ``go`` key (so that racers start together), then:


0. announces itself at ``ready:<tag>``;
1. for each ``race:<i>`` (created by the test at version 1) tries once to
   move it to version 2 with ``compare_and_set``; prints the rounds it won;
2. increments the integer at ``counter`` ``INCREMENTS`` times with a
   read / compare-and-set / retry-on-conflict loop.

Prints one JSON line: ``{"wins": [...], "conflicts": N}``.
"""

from __future__ import annotations

import json
import sys
import time

from estuary.state import Store, VersionConflict, open_store

# A racer that never sees "go" has lost its parent; 30 s is far longer than
# any test waits to write it.
GO_TIMEOUT_S = 30.0


def race(store: Store, *, tag: str, rounds: int, increments: int) -> dict[str, object]:
    """Run both races on ``store`` as racer ``tag``; return wins and conflict count."""
    store.put(f"ready:{tag}", b"1")
    deadline = time.monotonic() + GO_TIMEOUT_S
    # Busy-poll (no sleep) so that all racers leave the barrier within a
    # round trip of each other and really overlap.
    while store.get("go") is None:
        if time.monotonic() > deadline:
            raise TimeoutError("no go signal")
    wins = []
    for i in range(rounds):
        try:
            store.compare_and_set(f"race:{i}", tag.encode(), expected_version=1)
            wins.append(i)
        except VersionConflict:
            pass
    conflicts = 0
    for _ in range(increments):
        while True:
            current = store.get("counter")
            assert current is not None
            try:
                store.compare_and_set(
                    "counter",
                    str(int(current.value) + 1).encode(),
                    expected_version=current.version,
                )
                break
            except VersionConflict:
                conflicts += 1
    return {"wins": wins, "conflicts": conflicts}


def main(argv: list[str]) -> None:
    """Entry point for the subprocess form."""
    url, prefix, tag, rounds, increments = argv
    store = open_store(url, prefix=prefix)
    try:
        result = race(store, tag=tag, rounds=int(rounds), increments=int(increments))
    finally:
        store.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
