"""Fused execution: several virtual nodes of a worker as one physical batch, same math.

A group of G virtual nodes runs as one batch of ``G * b`` samples, *interleaved*: sample ``i`` of node
``k`` of the group is row ``i * G + k``. Every sample-wise layer is blind to the order; what would mix
samples across virtual nodes is made per-segment (BatchNorm statistics, Dropout and attention-dropout
masks), and the interleaving is what makes that cheap (see the BatchNorm forward in ``patches``).

One module per concern:

- ``fusable``: what can be fused. Leaf modules not known to be sample-wise make ``check_fusable``
  report them; the engine then runs sequentially, with a warning. Custom composite modules are
  assumed to compose their children sample by sample.
- ``context``: ``FusionContext``, what the engine tells the patched modules about the running group.
- ``patches``: the patched modules (BatchNorm, Dropout, MultiheadAttention, transformer layers), their
  ``forward`` only, so parameter and buffer names, and so checkpoints, stay those of the user's model.
- ``layout``: where the samples are: the interleaved batch, and where they lie in a patched module's
  input (``vnodes_layout``, a transformer layer's ``batch_first``, or the one reading a shape allows).
- ``strides``: how a tensor lies in memory, so a node's copy looks to a dropout kernel as its own
  tensor does in sequential execution.
- ``randomness``: per-node random streams, and the check that nothing else drew from the defaults.
- ``fallback``: the errors that stop a group (``FusionUnsupported``, ``LayoutUnknown``, out of memory)
  and ``decide``, the pure policy the engine applies: halve the group, one node per group, run
  sequentially, or raise.

The package re-exports the public names of each (what the engine and the CUDA-graph replay import).
``NOISE_DEVICES`` is not re-exported: it is read from ``randomness`` at each call, so it is changed
there (a copy here would take a change silently and ignore it).
"""

from .context import FusionContext
from .fallback import (Decision, FailureKind, FusionUnsupported, GroupFailure, HalveGroup, LayoutUnknown,
                       OneNodePerGroup, Raise, Reraise, RunSequentially, decide, group_size_for, is_out_of_memory)
from .fusable import SAMPLE_WISE, check_fusable
from .layout import LAYOUTS, interleave_batches, leading_rows, segment_means
from .patches import patch_model
from .randomness import check_no_stray_draws, default_generator_states
from .strides import is_dense

__all__ = [
    "Decision", "FailureKind", "FusionContext", "FusionUnsupported", "GroupFailure", "HalveGroup", "LAYOUTS",
    "LayoutUnknown", "OneNodePerGroup", "Raise", "Reraise", "RunSequentially", "SAMPLE_WISE", "check_fusable",
    "check_no_stray_draws", "decide", "default_generator_states", "group_size_for", "interleave_batches",
    "is_dense", "is_out_of_memory", "leading_rows", "patch_model", "segment_means",
]
