"""vnodes.scheduler.cluster: sharing a pool of GPUs among many elastic vnodes jobs, simulated.

Modules:
    workload  -- ``TraceJob`` and ``load_workload``: Pollux workload CSVs and VirtualFlow JSON
                 traces as one list of jobs (arrival, requested GPUs, fixed global batch, work).
    apps      -- application profiles: ``step_time(gpus_per_node, global_batch)``,
                 ``steps_to_complete(global_batch)``, ``throughput``; Pollux's measured
                 applications and VirtualFlow's job configurations (how each is modelled, and why,
                 is in that module's docstring).
    traces/   -- the trace data with ``ATTRIBUTION.md`` (sources, licences).

What the simulated baselines do, as read from their code (the targets a simulator here meets):

Tiresias+TunedJobs in Pollux's simulator (``simulator/tiresias.py``, ``simulator/simulator.py``,
branch ``osdi21-artifact`` of github.com/petuum/adaptdl):
    * Cluster: 16 nodes x 4 GPUs. Clock: ``Cluster.step(60)`` first advances every job 60 s under
      the current allocations, then calls the policy at the new time with the jobs submitted by
      then and not finished. A job arriving at ``t`` is first seen at the next multiple of 60 s.
    * TunedJobs: each job runs at exactly ``num_replicas`` GPUs (``max_replicas``) with its
      CSV ``batch_size``; never fewer, never more.
    * 2D-LAS with two queues: new jobs join Q0 at the tail. While a job's status is RUNNING its
      ``executed_time`` grows by wall seconds (including its 30 s restart delay); it moves to the
      tail of Q1 once ``executed_time * num_replicas >= 16 GPU-hours`` (57,600 GPU-s; attained
      service is requested GPUs x running time). Starvation promotion is off
      (``_solve_starvation = 0``), so a job never returns to Q0.
    * Each interval: walk Q0 then Q1 in queue order; a job is RUNNING if its ``num_replicas``
      fit in the GPUs still uncounted (a count, not a topology check; a later smaller job may run
      past a blocked big one); otherwise it is PENDING and loses its GPUs (preempted, no penalty
      for stopping). Running jobs keep their GPUs (no migration, no re-packing). A newly RUNNING
      job takes GPUs one node at a time from the node with the most free GPUs (ties: lowest node
      index), so it is consolidated when whole nodes are free and scattered otherwise; its
      placement is the GPUs per node it got.
    * 30 s penalty: ``Job.reallocate`` sets ``rescale_time = 30`` whenever a job's GPU list
      changes to a non-empty one -- its first start and every resume after a preemption. During
      it the job holds its GPUs and makes no progress.
    * A job that finishes mid-interval completes at its exact time, but its GPUs stay idle until
      the interval ends.
    * Pollux rounds the time to cross each epoch boundary to whole seconds (``Job.step``); for
      short-epoch cifar10 jobs this adds ~2% (624 s vs 610 s exact on (4, 4, 4)).

JCT and the published averages (``simulator.py``, ``results-jobload/*/summary.json``):
    JCT = ``completion_time - submission_time`` per job; a workload's average is the mean over its
    160 jobs; the reported number is the mean of the eight workload averages (``summary["mean"]``):
    Tiresias 4,038.18 s (workloads 1-8: 2,473.65, 5,144.96, 3,876.26, 3,280.26, 3,501.01,
    3,469.69, 5,479.91, 5,079.71), Pollux 2,751.13 s, Optimus 5,681.93 s. Pollux's own simulator
    reproduces the Tiresias numbers exactly (checked with pandas 3.1 and scipy 1.17, all 8
    workloads); per-job JCTs are in ``traces/pollux/published/``.

VirtualFlow's scheduler (``deploy/scheduler.py``, ``deploy/scheduler_event.py``, branch
``virtual`` of github.com/andrewor14/models), one host of 8 GPUs:
    * Queue: jobs are appended on arrival and, except in FIFO mode, stably sorted by descending
      priority (1, 5, 10: the weights). A ``ScheduleEvent`` fires on every arrival and
      completion; while a run or resize is still pending it is retried every second.
    * FIFO / PRIORITY (``fifo_schedule``): start the queue head at its full ``gpu_demand`` if that
      many GPUs are free, repeat; stop at the first head that does not fit (no backfilling, no
      preemption, no resizing).
    * WFS (``wfs_schedule``): admit queue heads while there are fewer jobs than GPUs and no
      running job of *higher* priority than the candidate would drop below its current fair
      share; then resize running jobs and start the admitted ones at their fair shares.
      ``get_weighted_fair_shares(jobs)``, in rounds over unallocated jobs: share = free GPUs x
      priority / sum of priorities, at least 1, rounded down to a power of two; while the shares
      exceed the free GPUs, halve them in ascending priority order (each down to 1 before the
      next); every job whose share >= its demand gets its demand and leaves (its spare GPUs go
      to the next round); if none does, all get their shares and rounds end. Leftover GPUs: in
      descending priority, double a job's allocation while the leftover covers it and the demand
      is >= twice the allocation. A job never gets more than its demand; demand must be a
      multiple of the allocation (virtual nodes per GPU = demand x per-device / allocation).
    * Overheads in its medium20_12jph WFS log: a fresh start takes 70-106 s to its first report
      (mean 88 s); a shrink 0-4 s; a grow 18-120 s, spawned in the background while the job
      keeps training at its old size (the new GPUs are reserved meanwhile). Freed GPUs are
      released 10 s late (``GPU_RELEASE_WAIT_SECONDS=10`` in the experiment script).
    * Durations: the traces give none; see ``apps`` for the measured ones used here.
"""
