"""What can be fused: the modules whose forward fused execution can treat per virtual node."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Leaf modules that treat each sample independently (no statistics across the batch, no randomness).
SAMPLE_WISE = (
    nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten, nn.Embedding, nn.EmbeddingBag,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softmax, nn.LogSoftmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.Upsample,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.PixelShuffle,
)


def check_fusable(model: nn.Module) -> list[str]:
    """Names of the modules that fused execution cannot treat per virtual node (empty: fusable)."""
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, (_BatchNorm, nn.Dropout)):
            continue
        if isinstance(module, nn.MultiheadAttention):
            continue  # sample-wise; its dropout is drawn per segment
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            if module.track_running_stats:
                bad.append(f"{name} ({type(module).__name__} tracking running stats)")
            continue
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or \
                next(module.children(), None) is not None:
            continue  # a container: its leaves decide
        if not isinstance(module, SAMPLE_WISE) and not getattr(module, "vnodes_sample_wise", False):
            bad.append(f"{name} ({type(module).__name__}: unknown; set `vnodes_sample_wise = True` on it "
                       "if it treats samples independently)")
    return bad
