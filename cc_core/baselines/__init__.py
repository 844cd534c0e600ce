"""Baseline defenses compared in the paper: CLP (data-free) and ANP (1% clean data)."""
from cc_core.baselines.anp import ANPConfig, anp_masks, anp_prune
from cc_core.baselines.clp import channel_lipschitz, clp, clp_to_budget
from cc_core.baselines.pairs import conv_bn_pairs, nonzero_params

__all__ = ["ANPConfig", "anp_masks", "anp_prune", "channel_lipschitz", "clp", "clp_to_budget",
           "conv_bn_pairs", "nonzero_params"]
