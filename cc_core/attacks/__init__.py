"""Backdoor attacks: BadNet, Blended, WaNet, Input-Aware; all-to-one and all-to-all."""
from cc_core.attacks.base import (ATTACKS, Attack, AttackSpecError, build_attack, load_attack,
                                  parse_attack_name)
from cc_core.attacks.inputaware import InputAware, TriggerGenerator
from cc_core.attacks.static import BadNet, Blended, natural_pattern
from cc_core.attacks.wanet import WaNet

__all__ = ["ATTACKS", "Attack", "AttackSpecError", "BadNet", "Blended", "InputAware",
           "TriggerGenerator", "WaNet", "build_attack", "load_attack", "natural_pattern",
           "parse_attack_name"]
