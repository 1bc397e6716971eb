"""Plugins hosted by the master (``runtime/plugins.py`` says what a plugin is).

    from vnodes.runtime import JobSpec, train
    from vnodes.scheduler.plugins import (DynamicsRecorder, MetadataArchaeology, LabelCorrection,
                                          PrioritizedSampling, load_dynamics, analyze)

    spec = JobSpec(..., plugins=[DynamicsRecorder(), MetadataArchaeology()])
    train(spec, steps=S, checkpoint_dir=run_dir)
    dyn = load_dynamics(run_dir)   # dyn.loss: [num_samples, num_epochs], NaN where not recorded
    rep = analyze(run_dir)         # rep.p["mislabeled"]: p(mislabeled) per sample; rep.probes

``PLUGINS`` names the plugins the command line enables (``vnodes run job.py --plugin recorder``).
"""

from vnodes.runtime.plugins import Plugin, PluginJob, SampleBatch, SampleColumns, WorkerHalf, classification_signals

from .analysis import ArchaeologyReport, analyze
from .archaeology import MetadataArchaeology
from .correction import LabelCorrection
from .host import PluginHost
from .knn import knn_proba
from .prioritized import PrioritizedSampling
from .recorder import Dynamics, DynamicsRecorder, load_dynamics

PLUGINS = {"recorder": DynamicsRecorder, "archaeology": MetadataArchaeology, "correction": LabelCorrection,
           "prioritized": PrioritizedSampling}

__all__ = ["ArchaeologyReport", "Dynamics", "DynamicsRecorder", "LabelCorrection", "MetadataArchaeology", "PLUGINS",
           "Plugin", "PluginHost", "PluginJob", "PrioritizedSampling", "SampleBatch", "SampleColumns", "WorkerHalf",
           "analyze", "classification_signals", "knn_proba", "load_dynamics"]
