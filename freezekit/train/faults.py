"""Fault injection for tests: a run kills itself at a precise point, to prove ``--resume`` exact.

``FREEZEKIT_FAULT_KILL_AT=POINT`` makes the process send itself SIGKILL (no cleanup, like a power
cut or the OOM killer) when it reaches ``POINT``:

- ``step:N``: global training step ``N``, right after its optimizer step (mid-epoch);
- ``phase:K``: phase ``K`` of the schedule, once it is applied, recorded and summarized;
- ``checkpoint:E``: the checkpoint of epoch ``E``, written to its temporary file, not yet renamed.

``FREEZEKIT_FAULT_CHECKPOINT_PAUSE`` (in :mod:`freezekit.train.checkpoint`) pauses before that
rename instead. Unset, as outside tests, a check costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["kill_at"]

_KILL_ENV = "FREEZEKIT_FAULT_KILL_AT"


def kill_at(point: str, n: int) -> None:
    """Kill this process if ``FREEZEKIT_FAULT_KILL_AT`` is ``f"{point}:{n}"``."""
    wanted = os.environ.get(_KILL_ENV)
    if wanted and wanted == f"{point}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)
