"""`ember run|chat|bench MODEL --tp N` on one machine: the command itself starts its N ranks through
torch's elastic launcher (what torchrun runs), so nobody writes a torchrun line. Every rank runs the
same command line; rank 0 prints, the others only follow. Across machines, start the same command
under torchrun on each (see README, "Tensor parallelism")."""
from __future__ import annotations

import os
import sys
import uuid


def is_rank() -> bool:
    """Whether this process is already one rank of a launched group (torchrun's environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m ember.cli *argv` as `nproc` ranks on this machine; the exit status of the group.
    A rank that fails stops the others (the launcher ends them), with one line saying which."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    import logging

    # the launcher's own log lines (a failed rank's exit code, closing signals) repeat what the ranks
    # and this function report
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "ember.cli", *argv)
    except ChildFailedError as e:
        who, first = e.get_first_failure()  # the cause, not the ranks stopped after it
        if first.exitcode in (1, 2):  # an error rank 0 has reported (or a traceback the rank printed)
            return first.exitcode
        how = f"signal {-first.exitcode}" if first.exitcode < 0 else f"exit code {first.exitcode}"
        print(f"ember: error: tensor-parallel rank {who} of {nproc} failed ({how}); "
              f"all ranks were stopped", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException as e:  # Ctrl-C / SIGTERM: the launcher has stopped the ranks
        return 128 + int(e.sigval)
    return 0
