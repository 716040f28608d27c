"""The trainer: the lab's protocol, bit-identical reruns, selection, stopping, every variant trains."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import msa.training as training
from msa.config import MODALITIES, ConfigError, ModelConfig, RunConfig, TrainConfig
from msa.metrics import METRIC_NAMES
from msa.models import build_model, count_parameters
from msa.training import FitResult, fit, make_loss, predict, seed_everything

SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(MODALITIES, r)]


def run(model=None, **train) -> RunConfig:
    return RunConfig(model=model or ModelConfig(), train=TrainConfig(**{"epochs": 1, **train}))


def comparable(history):
    """A history without its wall-clock times, the one field that may differ between reruns."""
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


# --- the result -------------------------------------------------------------------------------------

def test_fit_returns_what_a_comparison_needs(tiny_data):
    seen = []
    result = fit(run(epochs=2), tiny_data, seed=0, callback=lambda e, m: seen.append((e, m)))
    assert isinstance(result, FitResult)
    assert [e for e, _ in seen] == [1, 2]
    expected_keys = ({"train_loss", "val_loss", "lr", "epoch_seconds"} | {f"val_{m}" for m in METRIC_NAMES})
    assert set(seen[0][1]) == expected_keys
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.best_epoch in (1, 2)
    assert result.n_params == 582_067 == count_parameters(result.model)
    assert result.val_pred.shape == (24,) and result.test_pred.shape == (24,)
    assert result.val_pred.dtype == np.float32
    assert set(result.test_metrics) == set(METRIC_NAMES) | {"loss"}
    best = result.history[result.best_epoch - 1]
    assert result.val_metrics == {**{m: best[f"val_{m}"] for m in METRIC_NAMES}, "loss": best["val_loss"]}
    assert not result.stopped_early and result.stop_reason is None
    # the returned model holds the best state, and the predictions are that state's
    for key, value in result.model.state_dict().items():
        assert torch.equal(value.cpu(), result.best_state[key])
    np.testing.assert_array_equal(predict(result.model, tiny_data["valid"]), result.val_pred)
    np.testing.assert_array_equal(predict(result.model, tiny_data["test"]), result.test_pred)


def test_lr_follows_a_per_batch_cosine_and_none_keeps_it_constant(tiny_data):
    batches = math.ceil(48 / 16)
    result = fit(run(epochs=3, lr=1e-3), tiny_data, seed=0, evaluate_test=False)
    lrs = [h["lr"] for h in result.history]
    expected = [0.5e-3 * (1 + math.cos(math.pi * e * batches / (3 * batches))) for e in range(3)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert result.test_metrics is None and result.test_pred is None
    constant = fit(run(epochs=2, scheduler="none"), tiny_data, seed=0, evaluate_test=False)
    assert [h["lr"] for h in constant.history] == [1e-3, 1e-3]


def test_fit_is_the_lab_loop(tiny_data):
    """One epoch of `fit` equals an obvious per-item loop over the same batches (the lab's, with
    its DataLoader's shuffling replaced by the seeded permutation `fit` uses)."""
    cfg = run(epochs=1, batch_size=8)
    result = fit(cfg, tiny_data, seed=5, evaluate_test=False, device="cpu")  # the loop below runs on the CPU

    seed_everything(5)
    model = build_model(cfg.model, tiny_data.dims)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
    criterion = nn.MSELoss()
    train = tiny_data["train"]
    order = torch.randperm(48, generator=torch.Generator().manual_seed(5)).tolist()
    losses = []
    for b in range(6):
        items = order[b * 8:(b + 1) * 8]
        vision, text, audio = (torch.stack([train.features[m][i] for i in items]) for m in MODALITIES)
        labels = torch.stack([train.labels[i] for i in items])
        optimizer.zero_grad()
        loss = criterion(model(vision, text, audio).view(-1), labels.view(-1))
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert result.history[0]["train_loss"] == pytest.approx(sum(losses) / 6, rel=1e-5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(result.best_state[key], value, msg=key)


# --- determinism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [ModelConfig(),
                                   ModelConfig(encoder="transformer", fusion="query_attention", mask_padding=True)],
                         ids=["baseline", "transformer-dropout"])
def test_same_seed_gives_bit_identical_results(tiny_data, model):
    a = fit(run(model, epochs=2), tiny_data, seed=7)
    b = fit(run(model, epochs=2), tiny_data, seed=7)
    assert comparable(a.history) == comparable(b.history)
    assert a.test_metrics == b.test_metrics
    np.testing.assert_array_equal(a.val_pred, b.val_pred)
    np.testing.assert_array_equal(a.test_pred, b.test_pred)
    for key in a.best_state:
        assert torch.equal(a.best_state[key], b.best_state[key]), key
    c = fit(run(model, epochs=2), tiny_data, seed=8)
    assert comparable(c.history) != comparable(a.history)


def test_fit_leaves_threads_and_determinism_settings_as_it_found_them(tiny_data):
    def settings():
        return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory,
                torch.backends.cuda.flash_sdp_enabled())  # attention kernels are left alone on a CPU

    before = settings()
    torch.set_num_threads(2)  # conftest runs tests on one thread: start from another count than fit's
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        seen = []
        fit(run(), tiny_data, seed=0, threads=1, evaluate_test=False, device="cpu",
            callback=lambda epoch, metrics: seen.append(settings()))
        # fit did change them while it ran: deterministic kernels, without NaN-filling each new tensor
        assert seen[0] == (1, True, False, True)
        assert settings() == (2, False, True, True)
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def test_init_state_is_where_training_starts(tiny_data):
    first = fit(run(), tiny_data, seed=0, evaluate_test=False)
    again = fit(run(), tiny_data, seed=0, evaluate_test=False)
    warm = fit(run(), tiny_data, seed=0, evaluate_test=False, init_state=first.best_state)
    assert comparable(again.history) == comparable(first.history)
    assert warm.history[0]["train_loss"] < first.history[0]["train_loss"]


# --- losses -----------------------------------------------------------------------------------------

def test_each_loss_is_the_torch_criterion_it_names():
    pred, target = torch.tensor([0.0, 1.0, -2.5]), torch.tensor([0.5, -1.0, 2.0])
    assert isinstance(make_loss(TrainConfig(loss="mse")), nn.MSELoss)
    assert isinstance(make_loss(TrainConfig(loss="l1")), nn.L1Loss)
    huber = make_loss(TrainConfig(loss="huber", huber_delta=0.5))
    assert isinstance(huber, nn.SmoothL1Loss) and huber.beta == 0.5
    # SmoothL1(beta) = Huber(delta=beta) / beta
    expected = nn.HuberLoss(delta=0.5)(pred, target) / 0.5
    torch.testing.assert_close(huber(pred, target), expected)


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_each_loss_trains_and_reports_val_loss_in_its_own_terms(tiny_data, loss):
    result = fit(run(loss=loss), tiny_data, seed=0)
    labels = tiny_data["valid"].labels
    criterion = make_loss(TrainConfig(loss=loss))
    expected = criterion(torch.from_numpy(result.val_pred), labels).item()
    assert result.history[0]["val_loss"] == pytest.approx(expected)
    assert math.isfinite(result.history[0]["train_loss"])


# --- every variant trains ---------------------------------------------------------------------------

VARIANTS = (
    [ModelConfig(encoder=e, fusion=f, mask_padding=m)
     for e in ("lstm", "transformer")
     for f in ("sum_lstm", "sum_transformer", "self_attention", "query_attention")
     for m in (False, True)]
    + [ModelConfig(input_layernorm=False), ModelConfig(encoder="transformer", pooling="last"),
       ModelConfig(pooling="mean", mask_padding=True, encoder_layers=2)]
    + [ModelConfig(modalities=s) for s in SUBSETS]
)


@pytest.mark.parametrize("model", VARIANTS, ids=lambda c: f"{c.encoder}-{c.fusion}-{'+'.join(c.modalities)}"
                         f"-ln{int(c.input_layernorm)}-mask{int(c.mask_padding)}-{c.pooling}-L{c.encoder_layers}")
def test_every_variant_trains_one_epoch(tiny_data, model):
    result = fit(run(model, grad_clip=1.0, weight_decay=1e-4), tiny_data, seed=0, evaluate_test=False)
    assert math.isfinite(result.history[0]["train_loss"])
    assert math.isfinite(result.history[0]["val_loss"])
    assert result.val_pred.shape == (24,) and np.isfinite(result.val_pred).all()
    assert result.model.modalities == model.modalities


# --- selection and stopping (validation metrics scripted) -------------------------------------------

def scripted(monkeypatch, **series):
    """Make the epochs' validation metrics follow `series` (metric -> one value per epoch)."""
    calls = iter(range(100))

    def fake(y_pred, y_true):
        i = next(calls)
        return {m: float(series[m][i]) if m in series else 0.5 for m in METRIC_NAMES}

    monkeypatch.setattr(training, "eval_mosi_regression", fake)


@pytest.mark.parametrize("metric,values,best", [
    ("Corr", [0.1, 0.3, 0.2, 0.3], 2),            # max; a tie keeps the earlier epoch
    ("MAE", [1.2, 0.9, 0.95, 0.9], 2),            # min
    ("Corr", [math.nan, 0.2, math.nan, 0.1], 2),  # NaN never wins
    ("Corr", [math.nan, math.nan, math.nan, math.nan], 1),  # ...but a state is always kept
    ("Mult_acc_7", [0.2, 0.2, 0.25, 0.1], 3),
])
def test_the_best_epoch_by_the_selection_metric_is_kept(tiny_data, monkeypatch, metric, values, best):
    scripted(monkeypatch, **{metric: values})
    result = fit(run(epochs=4, select_metric=metric), tiny_data, seed=0, evaluate_test=False)
    assert result.best_epoch == best
    np.testing.assert_equal(result.val_metrics[metric], values[best - 1])


def test_selection_on_val_loss_picks_the_lowest(tiny_data):
    result = fit(run(epochs=3, select_metric="val_loss"), tiny_data, seed=0, evaluate_test=False)
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))


def test_patience_stops_when_the_metric_stops_improving(tiny_data, monkeypatch):
    scripted(monkeypatch, Corr=[0.1, 0.3, 0.2, 0.25, 0.9, 0.9])
    result = fit(run(epochs=6, patience=2), tiny_data, seed=0, evaluate_test=False)
    assert len(result.history) == 4 and result.best_epoch == 2
    assert result.stopped_early and result.stop_reason == "patience"


def test_the_callback_can_stop_training_after_its_epoch(tiny_data):
    result = fit(run(epochs=5), tiny_data, seed=0, callback=lambda epoch, metrics: epoch == 2)
    assert len(result.history) == 2
    assert result.stopped_early and result.stop_reason == "callback"
    assert result.test_metrics is not None  # the best state so far is still evaluated once


# --- prediction -------------------------------------------------------------------------------------

def test_predict_does_not_depend_on_the_batch_size_and_keeps_the_mode(tiny_data):
    model = build_model(ModelConfig(), tiny_data.dims).train()
    a = predict(model, tiny_data["test"], batch_size=5)
    b = predict(model, tiny_data["test"], ("vision", "text", "audio"), batch_size=256, device="cpu")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert a.shape == (24,) and model.training


# --- precision --------------------------------------------------------------------------------------

def test_bf16_where_it_is_not_native_warns_once_and_trains_in_fp32_exactly(tiny_data):
    from msa.training import resolve_precision

    with pytest.warns(RuntimeWarning, match="training in fp32"):
        assert resolve_precision("bf16", torch.device("cpu"), supported=False) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu"), supported=True) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu"), supported=True) == "fp32"
    if training.bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has native bf16: the fallback cannot happen here")
    fp32 = fit(run(epochs=2), tiny_data, seed=0, evaluate_test=False, device="cpu")
    with pytest.warns(RuntimeWarning, match="no native bf16") as caught:
        asked = fit(run(epochs=2, precision="bf16"), tiny_data, seed=0, evaluate_test=False, device="cpu")
    assert len(caught) == 1 and asked.precision == "fp32"
    assert comparable(asked.history) == comparable(fp32.history)        # the fp32 run, bit for bit


def test_bf16_on_a_gpu_is_native_from_ampere_on_and_asked_of_the_device_named(monkeypatch):
    """A T4 or V100 (compute capability 7.x) only emulates bf16: slower, so no. Each GPU answers for itself."""
    capability = {0: (8, 0), 1: (7, 5)}
    asked = []

    def get_device_capability(device):
        asked.append(device)
        return capability[device.index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # what emulation answers
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    assert training.bf16_supported(torch.device("cuda:0"))
    assert not training.bf16_supported(torch.device("cuda:1"))
    assert asked == [torch.device("cuda:0"), torch.device("cuda:1")]


def test_bf16_trains_under_autocast_with_fp32_weights_and_loss(tiny_data, monkeypatch):
    monkeypatch.setattr(training, "bf16_supported", lambda device: True)   # emulated here, but the same path
    result = fit(run(epochs=2, precision="bf16"), tiny_data, seed=0)
    fp32 = fit(run(epochs=2), tiny_data, seed=0)
    assert result.precision == "bf16"
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.test_pred.dtype == np.float32
    assert comparable(result.history) != comparable(fp32.history)       # it did run in bf16
    assert abs(result.history[-1]["train_loss"] - fp32.history[-1]["train_loss"]) < 0.5


def test_precision_is_part_of_a_runs_identity_only_when_asked_for():
    from msa.config import RunConfig

    assert RunConfig().config_hash() == RunConfig.from_dict({"train": {"precision": "fp32"}}).config_hash()
    assert RunConfig().config_hash() != RunConfig.from_dict({"train": {"precision": "bf16"}}).config_hash()
    with pytest.raises(ConfigError, match="'precision' parameter of TrainConfig must be one of 'fp32', 'bf16'"):
        RunConfig.from_dict({"train": {"precision": "fp16"}})
