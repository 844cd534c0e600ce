"""Recovery fine-tune of the compact model on synthetic data only (docs/METHOD.md step 7).

  L = w_syn * CE(F(x_s), y_s)  +  w_adv * CE(F(x_adv), y_s)  +  w_unl * CE(F(x_trig), y_s)
      + w_kd * T^2 KL(T(x_s) || F(x_s))  +  w_feat * mean_l ||F_l(x_s) - T_l(x_s)||^2 / ||T_l(x_s)||^2
      + w_onl * CE(F(x_s + d), y_s),  d = PGD against F as it is at this step (||d||_inf <= eps)
      + w_uni * CE(F(x_s + u), y_s),  u = one universal perturbation (||u||_2 <= r) against F as it is
                                          at the start of each epoch
      + w_noi * T^2 KL(T(x_s) || F(x_s + n)),  n = random +-eps sign noise, drawn afresh per image and step
x_s: BN-statistics synthetic images with labels y_s; x_adv: their adversarial versions, trained
towards the BENIGN label y_s so backdoor-like perturbations stop flipping predictions; x_trig:
the same images carrying the scan's inverted trigger (one universal perturbation), also trained
towards y_s, so the model unlearns the trigger it was found to respond to;
T: the teacher (the clipped full-rank model), distilled on the clean synthetic images only:
its outputs on adversarial images may still carry the backdoor. F_l, T_l: the outputs of the
BatchNorm layer named l in student and teacher (compression keeps BN names), so the feature
term gives every layer its own target instead of only the logits. The online term perturbs each
batch afresh against the student being trained (towards the left-out class when there is one and
``online_adv_targeted``, else away from y_s), where x_adv is made once, before the fine-tune.
Each term is switched off by a zero weight; with every term off the model is returned untouched.

The universal term is the one that needs no trigger found: a backdoor is a small perturbation that
moves every input to one place, so the student is asked, epoch after epoch, for the single
perturbation of L2 norm ``universal_radius`` (pixel units) that raises its loss most on
``universal_samples`` of the synthetic images (``universal_steps`` of projected ascent, started
from the previous epoch's), and trained to keep the synthetic labels under it (I-BAU, Zeng et al.
2022, with the implicit hypergradient replaced by this alternation and real data by synthetic).

The noise term asks for the same output with and without random noise of a trigger's size (the
teacher's on the clean image, the student's own, detached, when there is no teacher): a backdoor
whose trigger is a dense pattern also answers to random patterns like it (the tuning zoo's noise
model sends a third of real images to its target under random +-8/255 noise), and noise needs no
trigger found.

With ``mixup_alpha`` > 0 the clean synthetic branch (the synthetic CE, both distillation terms)
sees mixup images x = lam x_i + (1 - lam) x_j, lam ~ Beta(alpha, alpha) per batch: the CE goes
towards lam y_i + (1 - lam) y_j and the teacher is asked about the mixed image itself, so a
thousand synthetic images give the distillation a new set of inputs every epoch.

When a class is left out of the fine-tune (the suspected backdoor target has no synthetic images
in x_s), every CE term pushes its logit down on every image and nothing pushes it back up, so the
fine-tune erodes that class. ``mask_left_out_class`` takes its column out of the CE softmax:
the three CE terms then only rank the classes that are present. ``kd_mask_left_out_class``
does the same for the distillation term: the teacher's and the student's logits lose that column
before the softmax, so the teacher (which may still carry the backdoor, and with it a high logit for
its target class) teaches only how the present classes rank, and the CE terms alone act on the
left-out class.

``label_smoothing`` s > 0 gives every CE term smoothed targets (s / K on each class the term
ranks, 1 - s on top for the label): a left-out class then gets a small positive target on every
image instead of being pushed down on all of them, a middle way between the plain CE and masking.

With ``ema_decay`` d > 0 the model ends with the exponential moving average of its weights over
the fine-tune's steps instead of the last step's weights: after step t (0, 1, ...),
theta_avg <- d_t theta_avg + (1 - d_t) theta with d_t = min(d, (1 + t) / (10 + t)), starting from
the weights it came with. The warm-up of d_t (TensorFlow's ExponentialMovingAverage with
num_updates) keeps those weights, which no step has trained, from weighing d^steps in the average
of a short fine-tune. BatchNorm statistics are frozen during the fine-tune, so the averaged
weights need no re-estimated statistics.

``max_grad_norm`` rescales each step's gradient (all parameters together) to at most that L2
norm. ``guarded_finetune`` runs the fine-tune and checks the student still fits its own
synthetic images; a student that fits fewer than COLLAPSE_ACC of them has collapsed (the first
steps' gradients can be large enough to wreck a heavily compacted student, after which every
image goes to one class), and the fine-tune is run again from the same start with its gradients
clipped.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.adversarial import PGDConfig, add_pixel_delta, perturb, predictions, universal_perturbation
from cc_core.data import random_crop, random_hflip
from cc_core.device import autocast, channels_last, precision
from cc_core.errors import ConfigError


# guarded_finetune: a student fitting fewer of its own synthetic images than this has collapsed
# (a healthy one fits nearly all; the bench rows record the fit); the run again clips its
# gradients to this norm. On the zoo Blended model at 4x (blend probe on, distilled) every real
# test image went to one class (10.00% ACC, sweep_defend_blend_teacher.md); the bench row with the
# guard is in benchmarks/RESULTS.md.
COLLAPSE_ACC = 0.5
COLLAPSE_GRAD_NORM = 10.0
UNLEARN_TARGETS = ("label", "clean_output")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    synth_weight: float = 1.0
    adv_weight: float = 1.0
    unlearn_weight: float = 0.0
    # What a triggered image is trained towards: its synthetic label ("label"), or the soft output
    # (at kd_temperature) the teacher gives the same image without the trigger, the student's own
    # when there is no teacher ("clean_output"): the synthetic images are classified so surely that
    # their labels leave little to learn, while a trigger's residual pull still shows in the output.
    unlearn_target: str = "label"
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    feature_weight: float = 0.0
    mask_left_out_class: bool = False
    kd_mask_left_out_class: bool = False
    freeze_bn: bool = True
    augment: bool = True
    mixup_alpha: float = 0.0
    ema_decay: float = 0.0
    label_smoothing: float = 0.0
    mixed_precision: bool = True
    max_grad_norm: float | None = None
    online_adv_weight: float = 0.0
    online_adv_eps: float = 8 / 255
    online_adv_steps: int = 5
    online_adv_targeted: bool = True
    universal_weight: float = 0.0
    universal_radius: float = 3.0
    universal_steps: int = 10
    universal_samples: int = 256
    noise_weight: float = 0.0
    noise_eps: float = 8 / 255
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("fine-tune needs epochs >= 0, batch_size >= 1 and lr > 0")
        if min(self.synth_weight, self.adv_weight, self.unlearn_weight, self.kd_weight, self.feature_weight,
               self.online_adv_weight, self.universal_weight, self.noise_weight) < 0:
            raise ConfigError("fine-tune loss weights must be >= 0")
        if self.unlearn_target not in UNLEARN_TARGETS:
            raise ConfigError(f"unlearn_target must be one of {', '.join(UNLEARN_TARGETS)}, got {self.unlearn_target!r}")
        if self.unlearn_target == "clean_output" and self.mixup_alpha:
            raise ConfigError("unlearn_target 'clean_output' compares each triggered image with the same image "
                              "unmixed; it needs mixup_alpha 0")
        if not self.mixup_alpha >= 0:
            raise ConfigError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {self.mixup_alpha!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 turns weight averaging off), got {self.ema_decay!r}")
        if not self.online_adv_eps > 0 or self.online_adv_steps < 1:
            raise ConfigError("the online adversarial term needs online_adv_eps > 0 and online_adv_steps >= 1, got "
                              f"{self.online_adv_eps!r} and {self.online_adv_steps!r}")
        if not self.universal_radius > 0 or self.universal_steps < 1 or self.universal_samples < 1:
            raise ConfigError("the universal term needs universal_radius > 0, universal_steps >= 1 and "
                              f"universal_samples >= 1, got {self.universal_radius!r}, {self.universal_steps!r} "
                              f"and {self.universal_samples!r}")
        if not self.noise_eps > 0:
            raise ConfigError(f"noise_eps must be > 0 (pixel units), got {self.noise_eps!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 (None turns clipping off), got {self.max_grad_norm!r}")

    @property
    def active(self) -> bool:
        return self.epochs > 0 and max(self.synth_weight, self.adv_weight, self.unlearn_weight, self.kd_weight,
                                       self.feature_weight, self.online_adv_weight, self.universal_weight,
                                       self.noise_weight) > 0

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.feature_weight > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


class BNOutputs:
    """Records the output of every BatchNorm layer of ``model`` by module name while active."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _hook(self, name: str):
        def record(module, inputs, out) -> None:
            self.outputs[name] = out.clone()  # not `out`: an in-place ReLU (VGG, MobileNet) overwrites it
        return record

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def drop_class(logits: torch.Tensor, cls: int | None) -> torch.Tensor:
    """(N, K) ``logits`` without column ``cls``: (N, K - 1); unchanged when ``cls`` is None."""
    if cls is None:
        return logits
    keep = torch.tensor([k for k in range(logits.shape[1]) if k != cls], device=logits.device)
    return logits.index_select(1, keep)


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the layers both have of ||s - t||^2 / ||t||^2 (relative squared error)."""
    names = [n for n in teacher if n in student]
    if not names:
        raise ConfigError("feature distillation found no BatchNorm layer shared by student and teacher")
    terms = [(student[n].float() - teacher[n].float()).pow(2).sum() / teacher[n].float().pow(2).sum().clamp_min(1e-12)
             for n in names]
    return torch.stack(terms).mean()


def finetune(model: nn.Module, x_syn: torch.Tensor, y_syn: torch.Tensor,
             x_adv: torch.Tensor | None = None, teacher: nn.Module | None = None,
             cfg: FinetuneConfig = FinetuneConfig(), progress: bool = True,
             x_trigger: torch.Tensor | None = None, left_out_class: int | None = None) -> list[dict]:
    """Fine-tune ``model`` in place; returns per-epoch mean losses. ``x_adv`` and ``x_trigger``
    (N, C, H, W) are perturbed copies of ``x_syn`` (same order); without ``x_trigger`` (the scan
    found no trigger) the unlearning term is skipped whatever its weight. ``left_out_class``: the
    class with no images in ``y_syn``, masked out of the CE terms when ``cfg.mask_left_out_class``
    and out of the distillation term when ``cfg.kd_mask_left_out_class``."""
    if cfg.adv_weight > 0 and x_adv is None:
        raise ConfigError("adv_weight > 0 needs adversarial synthetic images")
    if x_trigger is None or not cfg.unlearn_weight:
        cfg, x_trigger = dataclasses.replace(cfg, unlearn_weight=0.0), None
    if cfg.needs_teacher and teacher is None:
        raise ConfigError("kd_weight > 0 or feature_weight > 0 needs a teacher model")
    if not cfg.active:
        return []
    if left_out_class is not None and bool((y_syn == left_out_class).any()):
        raise ConfigError(f"class {left_out_class} is said to be left out, but y_syn has images of it")
    masked = left_out_class if cfg.mask_left_out_class else None
    kd_dropped = left_out_class if cfg.kd_mask_left_out_class else None
    student_bn = BNOutputs(model) if cfg.feature_weight else None
    teacher_bn = BNOutputs(teacher) if cfg.feature_weight else None
    try:
        with student_layout(model, cfg.mixed_precision), \
                (channels_last(teacher) if teacher is not None else contextlib.nullcontext()):
            return _train(model, x_syn, y_syn, x_adv, x_trigger, teacher, cfg, progress, student_bn, teacher_bn,
                          masked, kd_dropped, left_out_class)
    finally:
        for rec in (student_bn, teacher_bn):
            if rec is not None:
                rec.remove()


def same_augmentation(x: torch.Tensor, x_other: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``x_other`` (N, C, H, W each) through one random crop (padding 2) and horizontal
    flip per sample, the same for both: image i of one stays aligned with image i of the other."""
    both = random_hflip(random_crop(torch.cat([x, x_other], 1), 2, generator), generator)
    return both[:, :x.shape[1]], both[:, x.shape[1]:]


def synthetic_fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of synthetic images ``x`` (N, C, H, W) that ``model`` gives their label ``y`` (N,)."""
    with torch.no_grad():
        return float((predictions(model, x) == y).float().mean()) if len(y) else 1.0


def guarded_finetune(model: nn.Module, x_syn: torch.Tensor, y_syn: torch.Tensor,
                     x_adv: torch.Tensor | None = None, teacher: nn.Module | None = None,
                     cfg: FinetuneConfig = FinetuneConfig(), progress: bool = True,
                     x_trigger: torch.Tensor | None = None, left_out_class: int | None = None) -> tuple[list[dict], dict]:
    """``finetune`` (same arguments), then the collapse check: when the student fits fewer than
    COLLAPSE_ACC of ``x_syn`` and ``cfg`` does not clip already, it is fine-tuned again from the
    weights it came with, its gradients clipped to COLLAPSE_GRAD_NORM, and the run that fits more
    is kept. Returns (the kept run's history, {"synthetic_fit", "collapsed" (the first run),
    "retry_max_grad_norm" (None without a second run), "synthetic_fit_retry"})."""
    start = copy.deepcopy(model.state_dict()) if cfg.active else None
    history = finetune(model, x_syn, y_syn, x_adv, teacher, cfg, progress=progress, x_trigger=x_trigger,
                       left_out_class=left_out_class)
    fit = synthetic_fit(model, x_syn, y_syn)
    record = {"synthetic_fit": fit, "collapsed": cfg.active and fit < COLLAPSE_ACC,
              "retry_max_grad_norm": None, "synthetic_fit_retry": None}
    if not record["collapsed"] or cfg.max_grad_norm is not None:
        return history, record
    collapsed = copy.deepcopy(model.state_dict())
    model.load_state_dict(start)
    retry_cfg = dataclasses.replace(cfg, max_grad_norm=COLLAPSE_GRAD_NORM)
    retry_history = finetune(model, x_syn, y_syn, x_adv, teacher, retry_cfg, progress=progress, x_trigger=x_trigger,
                             left_out_class=left_out_class)
    record |= {"retry_max_grad_norm": COLLAPSE_GRAD_NORM, "synthetic_fit_retry": synthetic_fit(model, x_syn, y_syn)}
    if record["synthetic_fit_retry"] >= fit:
        return retry_history, record
    model.load_state_dict(collapsed)
    return history, record


def guard_text(record: dict) -> str:
    """The defend log's words for guarded_finetune's record ('' when the fine-tune did not collapse)."""
    if not record["collapsed"]:
        return ""
    if record["retry_max_grad_norm"] is None:
        return f"the student collapsed: it fits {record['synthetic_fit']:.0%} of its synthetic images"
    kept = "the clipped run is kept" if record["synthetic_fit_retry"] >= record["synthetic_fit"] else "the first run is kept"
    return (f"the student collapsed (it fit {record['synthetic_fit']:.0%} of its synthetic images) and was "
            f"fine-tuned again with gradients clipped to norm {record['retry_max_grad_norm']:g}: it fits "
            f"{record['synthetic_fit_retry']:.0%}; {kept}")


def student_layout(model: nn.Module, mixed_precision: bool):
    """channels_last for the student being trained, except under bf16 autocast on the CPU: there
    the weight-gradient backward in channels_last crashed the process (SIGSEGV, torch 2.13.0 on an
    AVX-512 bf16 CPU, the tests' tiny defended model; the zoo ResNet-18 trained fine), so the
    student stays contiguous. Forward-only models (the teacher) keep channels_last."""
    if precision(next(model.parameters()).device, mixed_precision) == "bfloat16":  # bf16 is CPU-only
        return contextlib.nullcontext(model)
    return channels_last(model)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, masked: int | None,
                         smoothing: float = 0.0) -> torch.Tensor:
    """CE of (N, K) ``logits`` over the classes other than ``masked`` (plain CE when None), its
    targets smoothed over those classes: 1 - smoothing + smoothing / K' on the label, smoothing / K'
    on each other class, K' the number of classes it ranks."""
    if masked is not None:
        others = torch.tensor([c for c in range(logits.shape[1]) if c != masked], device=logits.device)
        logits, labels = logits.index_select(1, others), labels - (labels > masked).long()
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class WeightAverage:
    """The moving average of a model's parameters over training steps, from the weights it starts
    with: after step t, avg <- d_t avg + (1 - d_t) theta, d_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.averaged = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.averaged, [p.detach() for p in model.parameters()], 1 - decay)
        self.steps += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, avg in zip(model.parameters(), self.averaged):
            p.copy_(avg)


def mixup_pairs(n: int, alpha: float, rng: random.Random, generator: torch.Generator) -> tuple[float, torch.Tensor]:
    """One mixing weight lam ~ Beta(alpha, alpha) and a partner index per sample: (n,) permutation."""
    return rng.betavariate(alpha, alpha), torch.randperm(n, generator=generator)


def random_sign_noise(shape: torch.Size, eps: float, generator: torch.Generator) -> torch.Tensor:
    """(N, C, H, W) noise of +-``eps`` (pixel units), each sign a coin flip of ``generator``."""
    signs = torch.randint(0, 2, tuple(shape), generator=generator).float() * 2 - 1
    return eps * signs


def online_pgd(cfg: FinetuneConfig) -> PGDConfig | None:
    """The PGD the online adversarial term runs on each batch against the student being trained
    (None when the term is off): cfg.online_adv_steps steps of 2.5 eps / steps, from a random start."""
    if not cfg.online_adv_weight:
        return None
    return PGDConfig(eps=cfg.online_adv_eps, step=2.5 * cfg.online_adv_eps / cfg.online_adv_steps,
                     steps=cfg.online_adv_steps, mixed_precision=cfg.mixed_precision, seed=cfg.seed)


def augmented_batch(x_syn: torch.Tensor, x_adv: torch.Tensor | None, x_trigger: torch.Tensor | None,
                    idx: torch.Tensor, cfg: FinetuneConfig, gen: torch.Generator):
    """The batch ``idx`` of the synthetic images and of their adversarial and triggered copies
    (None where there are none), each through a random crop and flip under ``cfg.augment``; under
    unlearn_target "clean_output" a triggered image gets its clean one's crop and flip."""
    xs = x_syn[idx]
    xa = x_adv[idx] if x_adv is not None else None
    xt = x_trigger[idx] if x_trigger is not None else None
    if cfg.augment and xt is not None and cfg.unlearn_target == "clean_output":
        xs, xt = same_augmentation(xs, xt, gen)  # each triggered image beside its own clean one
        xa = random_hflip(random_crop(xa, 2, gen), gen) if xa is not None else None
    elif cfg.augment:
        xs, xa, xt = (random_hflip(random_crop(v, 2, gen), gen) if v is not None else None for v in (xs, xa, xt))
    return xs, xa, xt


@dataclass
class BatchOutputs:
    """The student's logits (float, (B, K)) on one batch's images: synthetic (``syn``), adversarial,
    triggered, online-adversarial, universally perturbed and noisy (None where the term is off); the
    teacher's on the synthetic ones (``teacher``) and the BatchNorm outputs of both (``features``,
    ``teacher_features``) where the terms use them."""
    syn: torch.Tensor | None
    adv: torch.Tensor | None
    trigger: torch.Tensor | None
    online: torch.Tensor | None
    universal: torch.Tensor | None
    noise: torch.Tensor | None
    teacher: torch.Tensor | None
    features: dict | None
    teacher_features: dict | None


def loss_terms(out: BatchOutputs, ys: torch.Tensor, cfg: FinetuneConfig, ce, mix, kd_dropped: int | None,
               soft_unlearn: bool) -> dict[str, tuple[float, torch.Tensor]]:
    """The fine-tune's loss terms on one batch, in the order they are summed: {name: (weight, term)}
    for every term that is on. ``ce`` is the (masked, smoothed) cross-entropy, ``mix`` mixup's
    (lam, partner) or None."""
    def mixed(logits: torch.Tensor) -> torch.Tensor:
        term = ce(logits, ys)
        return term if mix is None else mix[0] * term + (1 - mix[0]) * ce(logits, ys[mix[1]])

    terms = {}
    if cfg.synth_weight:
        terms["syn"] = (cfg.synth_weight, mixed(out.syn))
    if cfg.adv_weight:
        terms["adv"] = (cfg.adv_weight, ce(out.adv, ys))
    if soft_unlearn:
        clean = out.teacher if out.teacher is not None else out.syn.detach()
        terms["unlearn"] = (cfg.unlearn_weight, distillation_loss(out.trigger, clean, cfg.kd_temperature))
    elif cfg.unlearn_weight:
        terms["unlearn"] = (cfg.unlearn_weight, ce(out.trigger, ys))
    if out.online is not None:
        terms["online_adv"] = (cfg.online_adv_weight, ce(out.online, ys))
    if out.universal is not None:
        terms["universal"] = (cfg.universal_weight, mixed(out.universal))
    if out.noise is not None:
        clean = out.teacher if out.teacher is not None else out.syn.detach()
        terms["noise"] = (cfg.noise_weight, distillation_loss(out.noise, clean, cfg.kd_temperature))
    if cfg.kd_weight:
        terms["kd"] = (cfg.kd_weight, distillation_loss(drop_class(out.syn, kd_dropped), drop_class(out.teacher, kd_dropped),
                                                        cfg.kd_temperature))
    if cfg.feature_weight:
        terms["feat"] = (cfg.feature_weight, feature_loss(out.features, out.teacher_features))
    return terms


def _train(model, x_syn, y_syn, x_adv, x_trigger, teacher, cfg: FinetuneConfig, progress: bool,
           student_bn: BNOutputs | None, teacher_bn: BNOutputs | None, masked: int | None,
           kd_dropped: int | None, left_out_class: int | None) -> list[dict]:
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    mix_rng = random.Random(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=True)
    n = len(y_syn)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    if teacher is not None:
        teacher.eval()
    history = []
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    online = online_pgd(cfg)
    online_target = left_out_class if cfg.online_adv_targeted else None
    universal = None
    universal_set = torch.randperm(n, generator=gen)[:cfg.universal_samples] if cfg.universal_weight else None

    def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(logits, labels, masked, cfg.label_smoothing)

    soft_unlearn = bool(cfg.unlearn_weight) and cfg.unlearn_target == "clean_output"
    needs_syn = bool(cfg.synth_weight or cfg.kd_weight or cfg.feature_weight or soft_unlearn or cfg.noise_weight)
    asks_teacher = cfg.needs_teacher or ((soft_unlearn or cfg.noise_weight > 0) and teacher is not None)
    bar = tqdm(total=steps, desc="fine-tune", disable=not progress, file=sys.stderr, leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        if cfg.freeze_bn:
            _set_bn_eval(model)
        if universal_set is not None:
            universal = universal_perturbation(model, x_syn[universal_set], y_syn[universal_set], cfg.universal_radius,
                                               cfg.universal_steps, model.cc_spec.mean, model.cc_spec.std,
                                               start=universal, mixed_precision=cfg.mixed_precision)
        order = torch.randperm(n, generator=gen)
        sums = dict.fromkeys(("syn", "adv", "unlearn", "kd", "feat", "online_adv", "universal", "noise"), 0.0)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xs, xa, xt = augmented_batch(x_syn, x_adv, x_trigger, idx, cfg, gen)
            ys = y_syn[idx]
            mix = mixup_pairs(len(idx), cfg.mixup_alpha, mix_rng, gen) if cfg.mixup_alpha else None
            if mix is not None:
                xs = mix[0] * xs + (1 - mix[0]) * xs[mix[1]]
            xo = (perturb(model, xs, ys, online, model.cc_spec.mean, model.cc_spec.std, gen, online_target)
                  if online is not None else None)
            xn = add_pixel_delta(xs, random_sign_noise(xs.shape, cfg.noise_eps, gen), model.cc_spec) if cfg.noise_weight else None
            with autocast(xs.device, cfg.mixed_precision):
                out_s = model(xs).float() if needs_syn else None
                student_feats = dict(student_bn.outputs) if student_bn else None
                out = BatchOutputs(
                    syn=out_s, features=student_feats,
                    adv=model(xa).float() if cfg.adv_weight else None,
                    trigger=model(xt).float() if cfg.unlearn_weight else None,
                    online=model(xo).float() if xo is not None else None,
                    universal=model(add_pixel_delta(xs, universal, model.cc_spec)).float() if universal is not None else None,
                    noise=model(xn).float() if xn is not None else None,
                    teacher=None, teacher_features=None)
                if asks_teacher:
                    with torch.no_grad():
                        out.teacher = teacher(xs).float()
                    out.teacher_features = teacher_bn.outputs if teacher_bn else None
            loss = torch.zeros((), device=xs.device)
            for name, (weight, term) in loss_terms(out, ys, cfg, ce, mix, kd_dropped, soft_unlearn).items():
                sums[name] += float(term.detach()) * len(idx)
                loss = loss + weight * term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            if average is not None:
                average.update(model)
            bar.update(1)
        history.append({"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}})
    bar.close()
    if average is not None:
        average.copy_to(model)
    model.eval()
    return history
