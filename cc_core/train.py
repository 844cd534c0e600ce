"""Seeded, resumable classifier training with optional backdoor poisoning.

Fast on CPU (docs/STACK.md): bf16 autocast (where the CPU runs it natively), channels_last,
whole-batch tensor augmentation; the same loop runs on CUDA with fp16 AMP. A checkpoint is
written after every epoch; calling again with the same output directory resumes from it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.data import ImageData, augment, iterate_batches, normalize
from cc_core.errors import ConfigError
from cc_core.fileio import atomic_path
from cc_core.device import autocast, resolve_device

SCHEDULES = ("onecycle", "cosine")
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Training options. ``lr`` is the peak learning rate of the schedule."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_fraction: float = 0.25
    label_smoothing: float = 0.0
    augment: bool = True
    hflip: bool = True
    # Stamp triggers on the augmented batch (as at test time) rather than before augmentation
    # (BackdoorBench): random crops otherwise cut a corner patch off ~40% of poisoned samples.
    poison_after_augment: bool = True
    mixed_precision: bool = True
    channels_last: bool = True
    threads: int | None = None
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be positive")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("warmup_fraction must be in [0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if total_steps < 4:  # too short for a schedule
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if cfg.schedule == "onecycle":
        # each phase needs at least one step
        pct_start = min(max(cfg.warmup_fraction, 2 / total_steps), 1 - 2 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start,
            anneal_strategy="linear", div_factor=25.0, final_div_factor=1e3)
    warmup = int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def poison_masks(attack, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the (N,) training labels ``y``'s images ``attack`` poisons and which it uses as its
    cross (noise) samples: two (N,) bool masks, all False without an attack."""
    poison, cross = torch.zeros(len(y), dtype=torch.bool), torch.zeros(len(y), dtype=torch.bool)
    if attack is not None:
        poison_idx, cross_idx = attack.select_indices(y)
        poison[torch.as_tensor(poison_idx, dtype=torch.long)] = True
        cross[torch.as_tensor(cross_idx, dtype=torch.long)] = True
    return poison, cross


@dataclass
class TrainingState:
    """What a checkpoint holds besides the config: the model, its optimizer and schedule, and an
    attack's trainable generator with its optimizer (None for attacks without one)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: nn.Module | None
    gen_optimizer: torch.optim.Optimizer | None

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.trainable is not None:
            state |= {"trainable": self.trainable.state_dict(), "gen_optimizer": self.gen_optimizer.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.trainable is not None:
            self.trainable.load_state_dict(state["trainable"])
            self.gen_optimizer.load_state_dict(state["gen_optimizer"])


def resume(checkpoint: Path | None, cfg: TrainConfig, n: int, training: TrainingState, device) -> tuple[list[dict], int]:
    """(history, epochs done) of the run ``checkpoint`` holds, loaded into ``training``, when it was
    written with this ``cfg`` on ``n`` images; ([], 0) otherwise."""
    if checkpoint is None or not checkpoint.exists():
        return [], 0
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    if state["config"] != cfg.to_dict() or state["n"] != n:
        return [], 0
    training.load_state_dict(state)
    print(f"[train] resuming from {checkpoint} after epoch {state['epoch']}", file=sys.stderr)
    return state["history"], state["epoch"]


def training_batch(xb: torch.Tensor, yb: torch.Tensor, poison: torch.Tensor, cross: torch.Tensor, attack,
                   cfg: TrainConfig, mean, std, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One batch as the model sees it: ``xb`` (B, C, H, W, pixels in [0, 1]) augmented and poisoned
    (in the order ``cfg.poison_after_augment`` says; ``poison`` / ``cross`` its (B,) masks), then
    normalized; returns (images, labels, the attack generator's auxiliary loss or None)."""
    aux = None
    if cfg.augment and cfg.poison_after_augment:
        xb = augment(xb, cfg.hflip, generator=gen)
    if attack is not None:
        trainable = attack.trainable()
        with torch.set_grad_enabled(trainable is not None):
            clean = xb
            xb, yb = attack.poison_batch(xb, yb, poison, cross, gen)
            if trainable is not None:
                aux = attack.auxiliary_loss(clean)
    if cfg.augment and not cfg.poison_after_augment:
        xb = augment(xb, cfg.hflip, generator=gen)
    xb = normalize(xb.float(), mean, std)
    if cfg.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb, yb, aux


def train_classifier(model: nn.Module, data: ImageData, cfg: TrainConfig, attack=None,
                     mean=None, std=None, out_dir: str | os.PathLike | None = None,
                     progress: bool = True,
                     on_epoch_end: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``model`` in place on ``data`` (poisoned by ``attack`` if given).

    Returns the per-epoch history. With ``out_dir``, a checkpoint is written there after every
    epoch and an existing one with the same config is resumed from.
    """
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    spec = getattr(model, "cc_spec", None)
    mean = mean if mean is not None else spec.mean
    std = std if std is not None else spec.std
    torch.manual_seed(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    x_all, y_all = data.tensors()
    n = len(y_all)
    poison_mask, cross_mask = poison_masks(attack, y_all)
    trainable = attack.trainable() if attack is not None else None

    steps_per_epoch = math.ceil(n / cfg.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    scheduler = _schedule(optimizer, cfg, cfg.epochs * steps_per_epoch)
    gen_optimizer = None
    if trainable is not None:
        trainable.to(device).train()
        gen_optimizer = torch.optim.Adam(trainable.parameters(), lr=attack.params["lr"], betas=(0.5, 0.9))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.mixed_precision)
    training = TrainingState(model, optimizer, scheduler, trainable, gen_optimizer)
    checkpoint = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    history, start_epoch = resume(checkpoint, cfg, n, training, device)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        t0 = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(iterate_batches(n, cfg.batch_size, True, cfg.seed * 7919 + epoch),
                   total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress or not sys.stderr.isatty(), file=sys.stderr, leave=False)
        for idx in bar:
            with autocast(device, cfg.mixed_precision):
                xb, yb, aux = training_batch(x_all[idx].to(device).float().div_(255), y_all[idx].to(device),
                                             poison_mask[idx].to(device), cross_mask[idx].to(device), attack, cfg,
                                             mean, std, gen)
                out = model(xb)
                loss = F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing)
                total = loss if aux is None else loss + aux.float()
            optimizer.zero_grad(set_to_none=True)
            if gen_optimizer is not None:
                gen_optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            if gen_optimizer is not None:
                scaler.step(gen_optimizer)
            scaler.update()
            scheduler.step()
            seen += len(yb)
            correct += int((out.argmax(1) == yb).sum())
            loss_sum += float(loss.detach()) * len(yb)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen,
                  "seconds": time.perf_counter() - t0, "lr": scheduler.get_last_lr()[0]}
        history.append(record)
        if progress:
            print(f"[train] epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.3f} "
                  f"train acc {record['train_acc']:.3f} ({record['seconds']:.0f} s)", file=sys.stderr)
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                torch.save({"config": cfg.to_dict(), "n": n, "epoch": epoch + 1, "history": history}
                           | training.state_dict(), tmp)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    model.eval()
    if trainable is not None:
        trainable.eval()
    return history
