"""Plugins hosted by the master (``runtime/plugins.py`` says what a plugin is).

    from vnodes.runtime import JobSpec, train
    from vnodes.scheduler.plugins import DynamicsRecorder, load_dynamics

    spec = JobSpec(..., plugins=[DynamicsRecorder()])
    train(spec, steps=S, checkpoint_dir=run_dir)
    dyn = load_dynamics(run_dir)   # dyn.loss: [num_samples, num_epochs], NaN where not recorded

``PLUGINS`` names the plugins the command line enables (``vnodes run job.py --plugin recorder``).
"""

from vnodes.runtime.plugins import Plugin, PluginJob, SampleBatch, SampleColumns, WorkerHalf, classification_signals

from .host import PluginHost
from .recorder import Dynamics, DynamicsRecorder, load_dynamics

PLUGINS = {"recorder": DynamicsRecorder}

__all__ = ["Dynamics", "DynamicsRecorder", "PLUGINS", "Plugin", "PluginHost", "PluginJob", "SampleBatch",
           "SampleColumns", "WorkerHalf", "classification_signals", "load_dynamics"]
