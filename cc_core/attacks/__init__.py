"""Backdoor attacks: BadNet, Blended, WaNet, Input-Aware, a global noise pattern (the tuning zoo's families) and SIG,
low frequency, BPP, a TrojanNN-shaped patch, Adap-Blend (the unseen zoo's); all-to-one and all-to-all."""
from cc_core.attacks.additive import SIG, LowFrequency, Noise
from cc_core.attacks.base import (ATTACKS, Attack, AttackSpecError, build_attack, load_attack,
                                  parse_attack_name)
from cc_core.attacks.bpp import BPP
from cc_core.attacks.inputaware import InputAware, TriggerGenerator
from cc_core.attacks.static import AdaptiveBlend, BadNet, Blended, TrojanPatch, natural_pattern
from cc_core.attacks.wanet import WaNet

__all__ = ["ATTACKS", "AdaptiveBlend", "Attack", "AttackSpecError", "BPP", "BadNet", "Blended", "InputAware",
           "LowFrequency", "Noise", "SIG", "TriggerGenerator", "TrojanPatch", "WaNet", "build_attack", "load_attack",
           "natural_pattern", "parse_attack_name"]
