"""The clean step around compaction: channel cleans (CLP's Lipschitz outliers, or the channels a
found trigger drives), the BatchNorm matching of the compact model, and the clipped full-rank
model the student distills from."""
from __future__ import annotations


import torch
from torch import nn

from cc_core.compact import clean_compact
from cc_core.compact.bn_match import match_bn_statistics
from cc_core.probes import RESIDUAL_FLIP, apply_found_trigger, trigger_flip_rate, trigger_score
from cc_core.defense.config import DefendConfig


def channel_clean(model: nn.Module, cfg: DefendConfig, x: torch.Tensor | None = None,
                  found: dict | None = None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with its outlier-Lipschitz channels (``cfg.channel_u``) zeroed, shrunk or
    held at their mean (``cfg.channel_mode``; the model itself when off, and when a probe's trigger
    fires and ``cfg.clp_with_trigger`` is False), then the trigger channel
    clean (``trigger_clean``) with ``found`` (channel_trigger's: the probes' firing trigger or an
    all-to-all universal perturbation) on synthetic images ``x``;
    and {"u", "mode", "pruned": {conv: n}, "n_pruned", "clp_skipped" (for the firing trigger),
    "trigger": trigger_clean's record}."""
    from cc_core.baselines.clp import clp

    skip_clp = (cfg.channel_u is not None and not cfg.clp_with_trigger and cfg.trigger_channel_u is not None
                and probe_fired(found))
    if cfg.channel_u is None or skip_clp:
        cleaned, info = model, {"u": None, "mode": None, "pruned": {}, "n_pruned": 0}
    else:
        cleaned, info = clp(model, cfg.channel_u, cfg.channel_mode)
    info["clp_skipped"] = skip_clp
    cleaned, info["trigger"] = trigger_clean(cleaned, x, found, cfg)
    return cleaned, info


def probe_fired(found: dict | None) -> bool:
    """Whether channel_trigger's ``found`` is a probe's firing trigger (not the universal perturbation)."""
    return bool(trigger_score(found)) and found.get("kind") != "perturbation"


def trigger_clean(model: nn.Module, x: torch.Tensor | None, found: dict | None,
                  cfg: DefendConfig) -> tuple[nn.Module, dict]:
    """``model`` with the channels the trigger ``found`` excites zeroed (cc_core.trigger_clean); else
    ``model`` itself. A probe's firing stamp, warp or blend cleans at z > ``cfg.trigger_channel_u``,
    and only when it still flips >= RESIDUAL_FLIP of the first ``found["n"]`` synthetic images ``x``
    on ``model`` (CLP's clean may have taken it out already); an all-to-all universal perturbation
    (channel_trigger's) at z > ``cfg.perturbation_channel_u``, whatever it flips there: inverted on
    the original, it can stop flipping the channel-cleaned model while the backdoor stays (the zoo's
    all-to-all Blended model, perturbation_clean.md). With ``cfg.perturbation_channel_floor`` the
    perturbation's threshold is lowered from there until it flips fewer than
    ``cfg.perturbation_channel_quiet`` of those images, but not past a threshold that costs a class
    more than ``cfg.perturbation_channel_keep`` allows (prune_until_quiet; the record's "flip_rates",
    "stopped_by" and "u" say where it stopped). The record: {"u", "kind" (the trigger's),
    "trigger_flip_rate" (on ``model``; None when no trigger or the clean is off),
    "trigger_flip_rate_after", "pruned", "n_pruned", "channels"}."""
    from cc_core.trigger_clean import prune_trigger_channels, prune_until_quiet

    perturbation = found is not None and found.get("kind") == "perturbation"
    u = cfg.perturbation_channel_u if perturbation else cfg.trigger_channel_u
    info = {"u": u, "kind": None, "trigger_flip_rate": None, "trigger_flip_rate_after": None,
            "pruned": {}, "n_pruned": 0, "channels": []}
    if u is None or x is None or not trigger_score(found):
        return model, info
    info["kind"] = found["kind"]
    info["trigger_flip_rate"] = trigger_flip_rate(model, x, found, found["n"])
    if info["trigger_flip_rate"] < RESIDUAL_FLIP and not perturbation:
        return model, info
    x_triggered = apply_found_trigger(x, found, model.cc_spec)
    if perturbation and cfg.perturbation_channel_floor is not None:
        pruned, channels = prune_until_quiet(model, x, x_triggered, lambda m: trigger_flip_rate(m, x, found, found["n"]),
                                             u, cfg.perturbation_channel_floor, cfg.perturbation_channel_quiet,
                                             min_keep=cfg.perturbation_channel_keep)
        after = channels["flip_rates"][-1][1]  # measured on the model it returns
    else:
        pruned, channels = prune_trigger_channels(model, x, x_triggered, u)
        after = trigger_flip_rate(pruned, x, found, found["n"])
    return pruned, info | channels | {"trigger_flip_rate_after": after}


def channel_clean_text(info: dict) -> str:
    """The defend log's words for channel_clean's record ``info``."""
    clp_text = ("no outlier-channel clean (a probe's trigger fired)" if info.get("clp_skipped")
                else f"{info['n_pruned']} outlier channels zeroed")
    return clp_text + trigger_clean_text(info["trigger"])


def trigger_clean_text(info: dict) -> str:
    """The defend log's words for the trigger channel clean ('' when it did not run)."""
    if info["trigger_flip_rate"] is None:
        return ""
    if not info["n_pruned"] and info["trigger_flip_rate_after"] is None:
        return f" (the probe's {info['kind']} flips {info['trigger_flip_rate']:.0%} after them: no trigger channel clean)"
    return (f", then {info['n_pruned']} channels the probe's {info['kind']} excites (it flips "
            f"{info['trigger_flip_rate']:.0%} -> {info['trigger_flip_rate_after']:.0%})")


def match_compact_bn(new: nn.Module, cleaned: nn.Module, cfg: DefendConfig, x: torch.Tensor,
                     clipped: nn.Module | None = None, found: dict | None = None) -> dict | None:
    """With ``cfg.bn_match_samples`` set, move the BatchNorm running statistics of the compact model
    ``new`` (in place) to those of ``cleaned`` with its singular values clipped at full rank
    (``clipped`` when already built, distillation_teacher's; only read), on the first
    bn_match_samples synthetic images ``x`` (N, C, H, W) (match_bn_statistics); returns its record,
    with the number of images, or None when off. Under ``cfg.bn_match_scope`` "trigger" nothing is
    moved unless ``found`` (channel_trigger's) is a probe's firing trigger: the record then says why."""
    if cfg.bn_match_samples is None:
        return None
    if cfg.bn_match_scope == "trigger" and not probe_fired(found):
        return {"images": 0, "skipped": "no probe's trigger fired"}
    reference = clipped if clipped is not None else clipped_full_rank(cleaned, cfg)
    device = next(new.parameters()).device
    x = x[:cfg.bn_match_samples]
    return match_bn_statistics(new, reference.to(device), x.to(device)) | {"images": len(x)}


def bn_match_text(record: dict) -> str:
    if record.get("skipped"):
        return f"BatchNorm statistics not matched ({record['skipped']})"
    return (f"BatchNorm statistics matched to the clipped full-rank model's on {record['images']} synthetic images: "
            f"{record['channels']} channels in {record['layers']} layers (largest std change "
            f"{record['max_scale_change']:.0%})")


def distillation_teacher(cleaned: nn.Module, cfg: DefendConfig) -> nn.Module | None:
    """The clean-step-only model KD distills from: ``cleaned`` (the channel-cleaned original)
    with its singular values clipped at full rank; None without KD."""
    if not cfg.finetune.needs_teacher:
        return None
    return clipped_full_rank(cleaned, cfg)


def clipped_full_rank(cleaned: nn.Module, cfg: DefendConfig) -> nn.Module:
    """``cleaned`` with its singular values clipped at ``cfg.tau`` and no rank cut, in eval mode."""
    model, _ = clean_compact(cleaned, ratio=1.0, tau=cfg.tau, normalizer=cfg.normalizer)
    return model.eval()
