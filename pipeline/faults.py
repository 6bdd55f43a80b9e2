"""Fault injection for resilience tests; does nothing unless SPECVLM_FAULTS is set.

    SPECVLM_FAULTS=decode_exit_once:/tmp/marker   the first decode call anywhere kills its process (a crashed
                                                  GPU actor); the marker file makes it happen only once
    SPECVLM_FAULTS=shard_written_exit_once:/tmp/m  the driver dies right after its first shard file lands (a
                                                  killed job, at a point that does not depend on timing)

The variable is read where the fault would strike, so it reaches Ray workers through their environment.
"""

from __future__ import annotations

import os
from pathlib import Path


def inject_fault(point: str) -> None:
    spec = os.environ.get("SPECVLM_FAULTS", "")
    for fault in filter(None, spec.split(",")):
        name, _, marker = fault.partition(":")
        if name == f"{point}_exit_once" and marker:
            try:
                Path(marker).touch(exist_ok=False)  # atomic: exactly one process wins
            except FileExistsError:
                continue
            os._exit(17)
