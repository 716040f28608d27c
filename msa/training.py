"""Train one model on one data set with one seed: the lab's protocol, deterministic and fast.

`fit` is a flat loop you can read top to bottom: seed, build, then per epoch shuffle-by-index, train,
validate, select, report through a callback. It knows nothing of MLflow, Optuna or files; those plug
in through `callback(epoch, metrics)`, which may ask to stop by returning True.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from msa.config import RunConfig, TrainConfig
from msa.data import MOSIData, Split
from msa.metrics import METRIC_NAMES, eval_mosi_regression, is_better
from msa.models import build_model, count_parameters

Callback = Callable[[int, dict[str, float]], "bool | None"]


# --- losses -----------------------------------------------------------------------------------------

def make_loss(train_cfg: TrainConfig) -> nn.Module:
    """The training criterion: mse (the lab's), l1 (MAE) or huber."""
    if train_cfg.loss == "mse":
        return nn.MSELoss()
    if train_cfg.loss == "l1":
        return nn.L1Loss()
    if train_cfg.loss == "huber":
        # HuberLoss(delta) == delta * SmoothL1Loss(beta=delta): the same minimiser, a gradient scaled
        # by delta. We use SmoothL1Loss as the lab does (`nn.SmoothL1Loss()`, i.e. beta = 1, where the
        # two coincide), so `huber_delta` is SmoothL1's beta and the learning rate keeps its meaning.
        return nn.SmoothL1Loss(beta=train_cfg.huber_delta)
    raise ValueError(f"unknown loss {train_cfg.loss!r}; expected 'mse', 'l1' or 'huber'")


def make_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """The lab's Adam. Fused (one kernel per tensor, no Python loop over 30-odd parameters) where this
    torch has it for the device, foreach otherwise: the same update rule either way."""
    params, kwargs = list(model.parameters()), dict(lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # torch < 2.4 has no fused Adam on CPU
        return torch.optim.Adam(params, foreach=True, **kwargs)


# --- reproducibility --------------------------------------------------------------------------------

def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices); with `deterministic`, ask torch for deterministic
    kernels (global settings: `fit` restores them when it returns)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs this before its first use to be reproducible; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a CUDA op without a deterministic kernel warns instead of aborting the run.
        _set_deterministic(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN (to expose reads of uninitialized
        # memory, which this code never makes): ~9% of an LSTM epoch on a CPU, same results without.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _set_deterministic(mode: bool, *, warn_only: bool) -> None:
    """torch.use_deterministic_algorithms, without the import of torch._inductor's config that it
    makes to inform torch.compile (which msa never uses): that import cost about 1 s on every
    process's first run. The switch itself is the one call below."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # a torch that moved it: the public way, import included
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


@contextlib.contextmanager
def _torch_settings(threads: int | None) -> Iterator[None]:
    """Restore the process-wide torch settings `fit` changes (threads, determinism) on the way out."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.utils.deterministic.fill_uninitialized_memory)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        _set_deterministic(saved[1], warn_only=saved[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3], saved[4]
        torch.utils.deterministic.fill_uninitialized_memory = saved[5]


@contextlib.contextmanager
def _deterministic_attention(device: torch.device) -> Iterator[None]:
    """On a GPU, scaled-dot-product attention in its math kernel only. cuDNN's, flash and memory-efficient
    attention have non-deterministic backward passes (torch warns that each "defaults to a
    non-deterministic algorithm"), so without this a Transformer variant rerun on CUDA is not the same
    run. At these sequence lengths (T = 50) the math kernel costs little. On a CPU nothing changes, so
    CPU results stay what they were."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel  # restores the kernels it found on the way out

    with sdpa_kernel(SDPBackend.MATH):
        yield


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- precision --------------------------------------------------------------------------------------

@functools.cache
def _cpuinfo(field: str) -> str:
    """The first processor's `field` in /proc/cpuinfo; '' where there is none (not Linux). Read once
    per field and process: every run asks for the flags and the model name."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix work is native here, so autocast makes it faster: a CUDA device with bf16
    (Ampere and later), or a CPU with AVX-512 BF16 or AMX. Elsewhere it is emulated, i.e. slower."""
    if device.type == "cuda":  # not torch.cuda.is_bf16_supported(): it counts emulation, on the current device
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":  # no flags (not Linux): no reliable way to tell, and never risk a slower run
        flags = _cpuinfo("flags").split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def device_name(device: torch.device) -> str:
    """What a run's numbers depend on beyond its config, seed and thread count: the GPU's name, or the
    CPU's model (torch draws dropout masks with MKL's generator on Intel CPUs only, so one seed gives
    other masks on an AMD CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def resolve_precision(requested: str, device: torch.device, supported: bool | None = None) -> str:
    """The precision a run trains in: bf16 only where the hardware has it (`supported`, by default
    `bf16_supported(device)`); else fp32, with one warning line, never silently slower."""
    if requested == "bf16" and not (bf16_supported(device) if supported is None else supported):
        warnings.warn(f"bf16 was asked for, but this {device.type} has no native bf16 (it would run slower): "
                      "training in fp32", RuntimeWarning, stacklevel=2)
        return "fp32"
    return requested


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context: bf16 where asked for, a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --- inference --------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, split: Split, modalities: Sequence[str] | None = None,
            batch_size: int = 256, device: torch.device | str | None = None, precision: str = "fp32") -> np.ndarray:
    """(N,) float32 predictions for every row of `split`, in order, in eval mode and without grad."""
    modalities = tuple(modalities or model.modalities)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return _predict_inputs(model, [x.to(device) for x in split.inputs(modalities)], batch_size, precision)


@torch.no_grad()
def _predict_inputs(model: nn.Module, inputs: Sequence[torch.Tensor], batch_size: int,
                    precision: str = "fp32") -> np.ndarray:
    """`predict` on feature tensors already on the model's device: [(N, T, D)] -> (N,)."""
    was_training = model.training
    model.eval()
    try:
        with autocast(inputs[0].device, precision):
            out = [model(*(x[i:i + batch_size] for x in inputs)).view(-1)
                   for i in range(0, len(inputs[0]), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).float().cpu().numpy()


# --- the trainer ------------------------------------------------------------------------------------

@dataclass
class FitResult:
    """What one run produced; the best checkpoint is what every `val_*`/`test_*` field describes."""

    history: list[dict[str, float]]        # one dict per epoch: 'epoch' plus what the callback got
    best_epoch: int                        # 1-based epoch whose state was kept
    best_state: dict[str, torch.Tensor]    # that epoch's state_dict, copied to CPU
    best_value: float                      # the selection metric (train.select_key) at best_epoch
    val_metrics: dict[str, float]          # eval_mosi_regression on valid at best_epoch, plus 'loss'
    val_pred: np.ndarray                   # (N_valid,) predictions of the best state
    test_metrics: dict[str, float] | None  # the same on test, computed once at the end; None if not asked
    test_pred: np.ndarray | None           # (N_test,) predictions of the best state, or None
    n_params: int                          # trainable parameters
    stopped_early: bool                    # ended before `epochs` (patience or the callback)
    stop_reason: str | None                # 'patience', 'callback', or None when all epochs ran
    precision: str                         # what it trained in: fp32, or bf16 where asked for and native
    model: nn.Module                       # the model, with best_state loaded, on the training device


def fit(run_config: RunConfig, data: MOSIData, *, seed: int, callback: Callback | None = None,
        device: torch.device | str | None = None, threads: int | None = None,
        evaluate_test: bool = True, init_state: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Train `run_config.model` on `data['train']` with the lab's protocol; select on `data['valid']`.

    Same config, data, seed (and thread count) on CPU give bit-identical results, except
    `epoch_seconds`. The callback gets `(epoch, metrics)` after each epoch, epoch 1-based, with
    train_loss, val_loss, val_<metric> for every metric, lr (at the epoch's first batch) and
    epoch_seconds; returning True stops training after that epoch.
    """
    mcfg, tcfg = run_config.model, run_config.train
    device = torch.device(device) if device is not None else default_device()
    precision = resolve_precision(tcfg.precision, device)
    with _torch_settings(threads), _deterministic_attention(device):
        seed_everything(seed)
        model = build_model(mcfg, data.dims).to(device)
        if init_state is not None:
            model.load_state_dict(init_state)
        modalities = model.modalities
        criterion = make_loss(tcfg)
        optimizer = make_optimizer(model, tcfg)

        train, valid = data["train"], data["valid"]
        n_train = len(train)
        batches = math.ceil(n_train / tcfg.batch_size)  # the last batch may be short, as in the lab
        scheduler = (CosineAnnealingLR(optimizer, T_max=tcfg.epochs * batches)
                     if tcfg.scheduler == "cosine" else None)
        x_train = [x.to(device) for x in train.inputs(modalities)]  # [(N, T, D)], moved once
        x_valid = [x.to(device) for x in valid.inputs(modalities)]  # moved once, not every epoch
        y_train = train.labels.to(device)  # (N,)
        y_valid = valid.labels.to(device)
        shuffle = torch.Generator().manual_seed(seed)  # batch order depends on the seed alone

        history: list[dict[str, float]] = []
        best_value: float | None = None
        best_epoch, best_state = 0, {}
        stop_reason = None
        for epoch in range(1, tcfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            lr = optimizer.param_groups[0]["lr"]
            order = torch.randperm(n_train, generator=shuffle).to(device)
            # Losses are summed on the tensor and read once per epoch: `.item()` per batch would
            # synchronise (and on CPU costs a little) for a number nobody looks at until the end.
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for index in order.split(tcfg.batch_size):
                with autocast(device, precision):
                    pred = model(*(x[index] for x in x_train))  # (B,)
                loss = criterion(pred.float().view(-1), y_train[index])  # in fp32 whatever the forward ran in
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tcfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip, foreach=True)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                loss_sum += loss.detach()
            train_loss = loss_sum.item() / batches  # mean of batch losses, as the lab prints it

            val_pred = _predict_inputs(model, x_valid, tcfg.eval_batch_size, precision)
            # One loss over the whole split (the lab averages per-batch means; these differ only
            # through its short last batch).
            val_loss = criterion(torch.from_numpy(val_pred).to(device), y_valid).item()
            val = eval_mosi_regression(val_pred, valid.labels.numpy())
            metrics = {"train_loss": train_loss, "val_loss": val_loss,
                       **{f"val_{k}": v for k, v in val.items()},
                       "lr": lr, "epoch_seconds": time.perf_counter() - t0}
            history.append({"epoch": epoch, **metrics})

            value = metrics[tcfg.select_key]
            if is_better(value, best_value, higher=tcfg.higher_is_better):
                best_value, best_epoch = value, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best_val_pred = val_pred

            if callback is not None and callback(epoch, dict(metrics)):
                stop_reason = "callback"
                break
            if tcfg.patience is not None and epoch - best_epoch >= tcfg.patience:
                stop_reason = "patience"
                break

        model.load_state_dict(best_state)
        best = history[best_epoch - 1]
        val_metrics = {name: best[f"val_{name}"] for name in METRIC_NAMES} | {"loss": best["val_loss"]}
        test_metrics = test_pred = None
        if evaluate_test:
            test = data["test"]
            test_pred = predict(model, test, modalities, tcfg.eval_batch_size, device, precision)
            test_loss = criterion(torch.from_numpy(test_pred), test.labels).item()
            test_metrics = eval_mosi_regression(test_pred, test.labels.numpy()) | {"loss": test_loss}

    return FitResult(history=history, best_epoch=best_epoch, best_state=best_state, best_value=best_value,
                     val_metrics=val_metrics, val_pred=best_val_pred, test_metrics=test_metrics,
                     test_pred=test_pred, n_params=count_parameters(model),
                     stopped_early=stop_reason is not None, stop_reason=stop_reason, precision=precision, model=model)
