"""Which BatchNorm normalizes which conv's output: read off the traced graph, not module order.

In a pre-activation net a BN's input is a residual sum, not a conv output, so pairing by
module order (as CLP's reference code does) scales the wrong filters there.
"""
from __future__ import annotations

import torch.fx
from torch import nn


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """{conv name: bn name} for every BatchNorm2d whose input is exactly one conv's output
    (and that conv feeds nothing else)."""
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    pairs = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            pairs[source.target] = node.target
    return pairs


def prunable_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Convs whose output channels can be pruned one by one (not grouped)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}


def nonzero_params(model: nn.Module) -> int:
    return int(sum(int((p != 0).sum()) for p in model.parameters()))
