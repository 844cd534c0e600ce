"""``clean_compact``: clip normalized singular values (clean), prune ranks (compact)."""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.compact.activation import (ConvMoments, activation_svd, activation_tucker2, conv_moments,
                                        orthonormal_svd, orthonormal_tucker2)
from cc_core.compact.clip import NORMALIZERS, ClipResult, clip_matrix, clip_tucker2
from cc_core.compact.layers import FACTORIZED, SVDConv2d, Tucker2Conv2d, model_structure, set_submodule
from cc_core.compact.plan import CompactionPlan, LayerPlan, _round
from cc_core.compact.ranks import RANK_STRATEGIES, Candidate, allocate_by_damage, allocate_ranks, rank_options
from cc_core.compact.tucker import MatrixSVD, Tucker2, hooi_tucker2, hosvd_tucker2, matrix_svd
from cc_core.errors import ConfigError, RatioUnreachableError
from cc_core.device import channels_last
from cc_core.evalmode import eval_mode

METHODS = ("hosvd", "hooi", "activation")
DATA_FREE_METHODS = ("hosvd", "hooi")  # "activation" needs calibration images


def needs_calibration(rank_strategy: str | None, method: str | None) -> bool:
    """Whether :func:`clean_compact` with these options measures layers on calibration images."""
    return rank_strategy == "sensitivity" or method == "activation"


@dataclass(frozen=True)
class CompactConfig:
    """Options of :func:`clean_compact`, validated on construction.

    ratio: target compression of the whole model's parameter count (>= 1; 1 keeps full rank).
    tau: clip level for normalized singular values; None disables clipping.
    normalizer: per-layer s_sigma, one of max / mean / median / rms / none.
    method: "hosvd" (exact, fast), "hooi" (tensorly HOOI refinement at the chosen ranks) or
        "activation" (the clipped weight decomposed again so that truncation keeps what its outputs
        on the calibration images use, :mod:`cc_core.compact.activation`; needs calibration images;
        the plan's singular values and energy kept still describe the weight's own spectra).
    rank_strategy: "uniform" (one rank fraction of the channels everywhere), "energy"
        (one fraction of squared singular values kept everywhere) or "sensitivity" (ranks
        where the measured output change per parameter saved is smallest; needs calibration
        images, see :func:`clean_compact`).
    rank_multiple: ranks are multiples of this (CPU/GPU kernels prefer multiples of 8 or 16).
    decompose_1x1: factorize 1x1 convs by SVD: True, False, or None = only when the KxK convs
        alone cannot meet the ratio (e.g. MobileNet-V2, whose KxK convs are depthwise).
    min_channels: convs with fewer input or output channels stay as they are (the RGB stem).
    exclude: glob patterns of layer names never factorized (still clipped).
    """

    ratio: float = 2.0
    tau: float | None = None
    normalizer: str = "mean"
    method: str = "hosvd"
    hooi_iters: int = 10
    rank_strategy: str = "uniform"
    rank_multiple: int = 16
    decompose_1x1: bool | None = None
    min_channels: int = 8
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not self.ratio >= 1.0 or self.ratio == float("inf"):
            raise ConfigError(f"ratio must be a finite number >= 1, got {self.ratio!r}")
        if self.tau is not None and (not isinstance(self.tau, (int, float)) or not self.tau > 0):
            raise ConfigError(f"tau must be > 0 (or None for no clipping), got {self.tau!r}")
        if self.normalizer not in NORMALIZERS:
            raise ConfigError(f"unknown normalizer {self.normalizer!r}; choose from "
                              f"{', '.join(NORMALIZERS)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.rank_strategy not in RANK_STRATEGIES:
            raise ConfigError(f"unknown rank_strategy {self.rank_strategy!r}; choose from "
                              f"{', '.join(RANK_STRATEGIES)}")
        for name in ("rank_multiple", "hooi_iters", "min_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        return d


@dataclass
class _Layer:
    """Working state of one conv through decompose -> clean -> compact."""

    name: str
    conv: nn.Conv2d
    kind: str  # tucker2 | svd | skipped
    reason: str | None = None
    decomp: Tucker2 | MatrixSVD | None = None
    clip: ClipResult | None = None
    moments: ConvMoments | None = None
    # The weight's singular values before clipping, once decomp no longer carries them (a clipped
    # MatrixSVD's s is clipped; an activation-aware decomp's components are not the weight's).
    weight_spectra: list[torch.Tensor] | None = None

    def spectra(self) -> list[torch.Tensor]:
        if self.weight_spectra is not None:
            return self.weight_spectra
        if isinstance(self.decomp, Tucker2):
            return [self.decomp.s1, self.decomp.s2]
        return [self.decomp.s]

    def clipped_spectra(self) -> list[torch.Tensor]:
        spectra = self.spectra()
        if self.clip is None:
            return spectra
        return [s * f for s, f in zip(spectra, self.clip.factors)]


def _conv_params(conv: nn.Conv2d) -> int:
    return sum(p.numel() for p in conv.parameters())


def _classify(name: str, conv: nn.Conv2d, cfg: CompactConfig) -> tuple[str, str | None]:
    if conv.groups != 1:
        return "skipped", "grouped/depthwise conv"
    if min(conv.in_channels, conv.out_channels) < cfg.min_channels:
        return "skipped", f"fewer than min_channels={cfg.min_channels} channels"
    if tuple(conv.kernel_size) == (1, 1):
        if tuple(conv.padding) != (0, 0) if not isinstance(conv.padding, str) else conv.padding != "valid":
            return "skipped", "padded 1x1 conv"
        return "svd", None
    return "tucker2", None


def _collect(model: nn.Module, cfg: CompactConfig) -> list[_Layer]:
    inside_factorized = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, FACTORIZED)
                         for c, _ in m.named_modules() if c}
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name not in inside_factorized:
            kind, reason = _classify(name, m, cfg)
            layers.append(_Layer(name, m, kind, reason))
    return layers


def _decompose(layer: _Layer) -> None:
    w = layer.conv.weight.detach()
    if layer.kind == "tucker2":
        layer.decomp = hosvd_tucker2(w)
    else:
        layer.decomp = matrix_svd(w.reshape(w.shape[0], w.shape[1]))


def _reweight(layer: _Layer) -> None:
    """With the layer's activation moments, decompose its (clipped) weight again, activation-aware;
    the weight's own spectra stay the record."""
    if layer.moments is None or layer.decomp is None:
        return
    d, layer.weight_spectra = layer.decomp, layer.spectra()
    if isinstance(d, Tucker2):
        layer.decomp = activation_tucker2(d.to_tensor(), layer.moments, (d.s1, d.s2))
    else:
        layer.decomp = activation_svd(d.to_matrix(), layer.moments)


def _clean(layer: _Layer, cfg: CompactConfig) -> None:
    if isinstance(layer.decomp, Tucker2):
        layer.decomp, layer.clip = clip_tucker2(layer.decomp, cfg.tau, cfg.normalizer)
    else:
        layer.weight_spectra = layer.spectra()
        layer.decomp, layer.clip = clip_matrix(layer.decomp, cfg.tau, cfg.normalizer)


def _factorized_module(layer: _Layer, ranks: tuple[int, ...], cfg: CompactConfig) -> nn.Module:
    if isinstance(layer.decomp, MatrixSVD):
        svd = layer.decomp.truncate(ranks[0])
        return SVDConv2d.from_conv(layer.conv, orthonormal_svd(svd) if cfg.method == "activation" else svd)
    if cfg.method == "activation":
        return Tucker2Conv2d.from_conv(layer.conv, orthonormal_tucker2(layer.decomp.truncate(*ranks)))
    if cfg.method == "hooi":
        return Tucker2Conv2d.from_conv(
            layer.conv, hooi_tucker2(layer.decomp.to_tensor(), ranks, cfg.hooi_iters,
                                     spectra=(layer.decomp.s1, layer.decomp.s2)))
    return Tucker2Conv2d.from_conv(layer.conv, layer.decomp.truncate(*ranks))


def _write_dense(layer: _Layer) -> None:
    """Put the clipped full-rank weight back into the (kept) conv."""
    d = layer.decomp
    w = d.to_tensor() if isinstance(d, Tucker2) else d.to_matrix()
    with torch.no_grad():
        layer.conv.weight.copy_(w.reshape(layer.conv.weight.shape))


def _write_all_dense(layers: list[_Layer]) -> None:
    """Every decomposed conv back at its clipped full-rank weight."""
    for layer in layers:
        if layer.decomp is not None:
            _write_dense(layer)


def _measure_moments(model: nn.Module, layers: list[_Layer], calibration: torch.Tensor) -> None:
    """Each factorizable layer's activation moments on ``calibration``, in ``model`` with every
    decomposed conv at its clipped full-rank weight; the decomposed ones are decomposed again with them."""
    _write_all_dense(layers)
    names = [layer.name for layer in layers if layer.kind in ("tucker2", "svd")]
    with channels_last(model):
        moments = conv_moments(model, names, calibration)
    for layer in layers:
        layer.moments = moments.get(layer.name)
        _reweight(layer)


def _log_probs(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([F.log_softmax(model(x[i:i + batch_size].to(device)).float(), 1).cpu()
                          for i in range(0, len(x), batch_size)])


def _truncated_weight(layer: _Layer, ranks: tuple[int, ...]) -> torch.Tensor:
    d = layer.decomp
    w = d.truncate(*ranks).to_tensor() if isinstance(d, Tucker2) else d.truncate(ranks[0]).to_matrix()
    return w.reshape(layer.conv.weight.shape).to(layer.conv.weight.dtype)


def measure_damage(model: nn.Module, layers: list[_Layer], candidates: list[Candidate], multiple: int,
                   calibration: torch.Tensor) -> dict[str, dict[tuple[int, ...], float]]:
    """damage[layer][ranks] = KL(p || q) averaged over ``calibration`` (N, C, H, W), where p is
    the output of ``model`` with every decomposed conv at its (clipped) full rank and q the
    output with that one layer truncated to ``ranks`` (each option of :func:`rank_options`).
    The convs are left holding their clipped full-rank weights."""
    by_name = {layer.name: layer for layer in layers}
    _write_all_dense(layers)
    damage = {}
    with eval_mode(model), channels_last(model):
        reference = _log_probs(model, calibration)
        for c in candidates:
            layer = by_name[c.name]
            full = layer.conv.weight.detach().clone()
            damage[c.name] = {}
            for ranks in rank_options(c, multiple):
                with torch.no_grad():
                    layer.conv.weight.copy_(_truncated_weight(layer, ranks))
                q = _log_probs(model, calibration)
                damage[c.name][ranks] = float(F.kl_div(q, reference, log_target=True, reduction="batchmean"))
            with torch.no_grad():
                layer.conv.weight.copy_(full)
    return damage


def _allocate(layers: list[_Layer], model: nn.Module, cfg: CompactConfig,
              params_before: int, calibration: torch.Tensor | None) -> tuple[dict, bool]:
    """Ranks for every decomposed layer; also whether 1x1 convs were factorized."""
    target = int(params_before / cfg.ratio)
    damage: dict[str, dict] = {}
    options = [cfg.decompose_1x1] if cfg.decompose_1x1 is not None else [False, True]
    for with_1x1 in options:
        if with_1x1:
            for layer in layers:
                if layer.kind == "svd" and layer.decomp is None:
                    _decompose(layer)
                    _reweight(layer)
        cands = [Candidate(l.name, l.kind, tuple(l.conv.weight.shape), l.conv.bias is not None,
                           l.clipped_spectra())
                 for l in layers if l.decomp is not None
                 and (l.kind == "tucker2" or with_1x1)
                 and not any(fnmatch.fnmatchcase(l.name, p) for p in cfg.exclude)]
        fixed = params_before - sum(c.dense_params() for c in cands)
        try:
            if cfg.rank_strategy == "sensitivity":
                new = [c for c in cands if c.name not in damage]
                damage |= measure_damage(model, layers, new, cfg.rank_multiple, calibration)
                return allocate_by_damage(cands, fixed, target, damage), with_1x1
            return allocate_ranks(cands, fixed, target, cfg.rank_strategy, cfg.rank_multiple), with_1x1
        except RatioUnreachableError:
            if with_1x1 is options[-1]:
                raise
    raise AssertionError("unreachable")


def clean_compact(model: nn.Module, ratio: float = 2.0, tau: float | None = None,
                  calibration: torch.Tensor | None = None, **options) -> tuple[nn.Module, CompactionPlan]:
    """Clean (clip normalized singular values at ``tau``) and compact (prune Tucker-2 ranks so
    the whole model has ``1/ratio`` of its parameters) a copy of ``model``.

    Options are the other :class:`CompactConfig` fields. ``calibration`` (N, C, H, W): the
    images on which ``rank_strategy="sensitivity"`` measures each layer's damage (synthetic
    images are enough; no real data is needed); ignored by the other strategies. Returns the
    new model (the input is not modified) and the plan describing every conv's decision.
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(CompactConfig)}
    if unknown:
        raise ConfigError(f"unknown clean_compact options: {sorted(unknown)}")
    cfg = CompactConfig(ratio=ratio, tau=tau, **options)
    if needs_calibration(cfg.rank_strategy, cfg.method):
        if calibration is None or len(calibration) == 0:
            what = "rank_strategy 'sensitivity'" if cfg.rank_strategy == "sensitivity" else "method 'activation'"
            raise ConfigError(f"{what} measures each layer on calibration images: pass calibration=<images "
                              "(N, C, H, W)>, e.g. synthetic ones from cc_core.synth")
    new = copy.deepcopy(model)
    params_before = sum(p.numel() for p in new.parameters())
    timings = {}

    start = time.perf_counter()
    layers = _collect(new, cfg)
    for layer in layers:
        if layer.kind == "tucker2" or (layer.kind == "svd" and (cfg.tau is not None or cfg.decompose_1x1)):
            _decompose(layer)
    timings["decompose"] = time.perf_counter() - start

    start = time.perf_counter()
    if cfg.tau is not None:
        for layer in layers:
            if layer.decomp is not None:
                _clean(layer, cfg)
    timings["clean"] = time.perf_counter() - start

    start = time.perf_counter()
    if cfg.method == "activation":
        _measure_moments(new, layers, calibration)
    alloc, with_1x1 = _allocate(layers, new, cfg, params_before, calibration)
    layer_plans = []
    for layer in layers:
        ranks = alloc.get(layer.name)
        before = _conv_params(layer.conv)
        if ranks is not None:
            module = _factorized_module(layer, ranks, cfg)
            set_submodule(new, layer.name, module)
            after, kind = sum(p.numel() for p in module.parameters()), layer.kind
        else:
            if layer.clip is not None:
                _write_dense(layer)
            after, kind = before, ("dense" if layer.decomp is not None else "skipped")
        layer_plans.append(_layer_plan(layer, kind, ranks, before, after))
    timings["compact"] = time.perf_counter() - start

    params_after = sum(p.numel() for p in new.parameters())
    spec = getattr(model, "cc_spec", None)
    if spec is not None:
        new.cc_spec = spec.replace(structure=model_structure(new))
    resolved = cfg.to_dict() | {"decompose_1x1": with_1x1}
    plan = CompactionPlan(
        arch=spec.arch if spec is not None else None, ratio_requested=float(cfg.ratio),
        ratio_achieved=params_before / params_after, params_before=params_before,
        params_after=params_after, config=resolved, layers=layer_plans, timings_s=timings)
    return new, plan


def _layer_plan(layer: _Layer, kind: str, ranks, before: int, after: int) -> LayerPlan:
    plan = LayerPlan(name=layer.name, kind=kind, shape=list(layer.conv.weight.shape),
                     params_before=before, params_after=after, reason=layer.reason)
    if layer.decomp is None:
        return plan
    plan.full_ranks = [len(s) for s in layer.spectra()]
    plan.ranks = list(ranks) if ranks is not None else None
    plan.singular_values = [_round(s.tolist()) for s in layer.spectra()]
    if layer.clip is not None:
        plan.clip = {"normalizer": _round(layer.clip.normalizers),
                     "threshold": _round(layer.clip.thresholds),
                     "n_clipped": layer.clip.n_clipped,
                     "factors": [_round(f.tolist()) for f in layer.clip.factors]}
    if ranks is not None:
        cand = Candidate(layer.name, layer.kind, tuple(layer.conv.weight.shape),
                         layer.conv.bias is not None, layer.clipped_spectra())
        plan.energy_kept = round(cand.energy_kept(tuple(ranks)), 6)
    return plan
