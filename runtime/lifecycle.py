"""A worker's lifecycle: the phases its main thread goes through, one vocabulary for the agent, the
hang watchdog (``watchdog.py``) and fault injection (``faults.py``)."""

from __future__ import annotations

import enum


class WorkerPhase(str, enum.Enum):
    """What a worker's main thread is doing. The legal transitions (``agent.py``)::

        IDLE -> JOIN (register; fetch the job's code) -> BUILD (dataset, model, optimizer) -> PLAN
        PLAN --RUN in a new epoch--> JOIN (form the epoch's group; receive state) -> COMPUTE
        PLAN --RUN--> COMPUTE -> REDUCE -> COMMIT --COMMIT--> APPLY -> PLAN
                                                  --ABORT---> PLAN   (redo the step in the next epoch)
        PLAN --CHECKPOINT--> CHECKPOINT -> PLAN
        PLAN --STOP--> (exit)

    COMPUTE runs LOAD, FORWARD and BACKWARD for each of the worker's virtual nodes (the phases that
    fault injection can target inside it), and CHECKPOINT ends with CHECKPOINT_WRITE (the file is
    written, not yet renamed into place). The waiting phases wait on peers or on the master and may
    take as long as those need; the others are local work, which the watchdog judges.
    """

    IDLE = "idle"
    JOIN = "join"
    BUILD = "build"
    PLAN = "plan"
    COMPUTE = "compute"
    LOAD = "load"
    FORWARD = "forward"
    BACKWARD = "backward"
    REDUCE = "reduce"
    COMMIT = "commit"
    APPLY = "apply"
    CHECKPOINT = "checkpoint"
    CHECKPOINT_WRITE = "checkpoint_write"

    @property
    def waits(self) -> bool:
        """Waits on peers or the master (never judged hung), rather than local work."""
        return self in _WAITING


_WAITING = frozenset({WorkerPhase.IDLE, WorkerPhase.JOIN, WorkerPhase.BUILD, WorkerPhase.PLAN, WorkerPhase.REDUCE,
                      WorkerPhase.COMMIT})

# The phases fault injection can stop a worker in (``VNODES_FAULT``), in step order.
FAULT_PHASES = (WorkerPhase.LOAD, WorkerPhase.FORWARD, WorkerPhase.BACKWARD, WorkerPhase.REDUCE, WorkerPhase.COMMIT,
                WorkerPhase.CHECKPOINT_WRITE)
