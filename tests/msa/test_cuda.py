"""The trainer on a CUDA GPU: what `--device cuda` relies on. These run only where torch sees a CUDA
device (CI has none; they ran on an H200, see the README's GPU section) and skip elsewhere, saying so."""

import gc
import math
import warnings

import numpy as np
import pytest
import torch

import msa.training as training
from msa.config import ModelConfig, RunConfig, TrainConfig
from msa.models import build_model
from msa.training import fit, predict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the GPU path is tested where torch sees one")

MODELS = {"baseline": ModelConfig(),
          "transformer-query": ModelConfig(encoder="transformer", pooling="mean", fusion="query_attention",
                                           mask_padding=True),
          "self-attention": ModelConfig(fusion="self_attention"),
          "packed-lstm-crossmodal": ModelConfig(encoder="packed_lstm", fusion="crossmodal")}


def run(model=None, **train) -> RunConfig:
    return RunConfig(model=model or ModelConfig(), train=TrainConfig(**{"epochs": 2, **train}))


def comparable(history):
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_on_cuda_gives_bit_identical_results(tiny_data, name):
    """cuBLAS, cuDNN's LSTM and the attention kernels in deterministic mode: a rerun is the same run."""
    a = fit(run(MODELS[name]), tiny_data, seed=3, device="cuda")
    b = fit(run(MODELS[name]), tiny_data, seed=3, device="cuda")
    assert next(a.model.parameters()).is_cuda
    assert comparable(a.history) == comparable(b.history)
    np.testing.assert_array_equal(a.test_pred, b.test_pred)
    for key in a.best_state:
        assert torch.equal(a.best_state[key], b.best_state[key]), key
    assert comparable(fit(run(MODELS[name]), tiny_data, seed=4, device="cuda").history) != comparable(a.history)


def test_a_model_trained_on_cuda_predicts_the_same_on_a_cpu(tiny_data):
    """The kept state comes back on the CPU, so a model trained on a GPU is served where there is none."""
    result = fit(run(), tiny_data, seed=0, device="cuda")
    assert all(t.device.type == "cpu" for t in result.best_state.values())
    cpu_model = build_model(ModelConfig(), tiny_data.dims)
    cpu_model.load_state_dict(result.best_state)
    np.testing.assert_allclose(predict(cpu_model, tiny_data["test"]), result.test_pred, rtol=1e-4, atol=1e-4)


def test_cuda_trains_the_same_model_as_the_cpu(tiny_data):
    """Without dropout (whose masks come from another generator on a GPU) one epoch on either device
    gives the same losses and predictions, to float rounding (cuDNN and cuBLAS sum in another order).
    Adam's step is about lr whatever the gradient's size, so a weight whose tiny gradient rounds to
    the other sign may differ by up to 2 lr per step, and no more."""
    cfg = run(ModelConfig(dropout=0.0), epochs=1)
    gpu = fit(cfg, tiny_data, seed=1, device="cuda", evaluate_test=False)
    cpu = fit(cfg, tiny_data, seed=1, device="cpu", evaluate_test=False)
    for key in ("train_loss", "val_loss", "val_Corr"):
        assert gpu.history[0][key] == pytest.approx(cpu.history[0][key], rel=1e-3, abs=1e-4), key
    np.testing.assert_allclose(gpu.val_pred, cpu.val_pred, atol=1e-2)
    bound = 2 * cfg.train.lr * math.ceil(len(tiny_data["train"]) / cfg.train.batch_size)
    worst = max((gpu.best_state[k] - cpu.best_state[k]).abs().max().item() for k in cpu.best_state)
    assert worst <= bound


def test_fit_on_cuda_uses_deterministic_attention_only_while_it_trains(tiny_data):
    """Flash, memory-efficient and cuDNN attention have non-deterministic backward passes: off while
    `fit` runs on a GPU (torch then warns of none), as they were once it returns."""
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
             torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before, seen = [f() for f in flags], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(run(MODELS["transformer-query"]), tiny_data, seed=0, device="cuda",
            callback=lambda epoch, metrics: seen.append([f() for f in flags]))
    assert seen == [[False, False, False, True]] * 2
    assert [f() for f in flags] == before
    assert not [w for w in caught if "non-deterministic" in str(w.message)]


def test_bf16_on_cuda_is_native_and_trains_with_fp32_weights(tiny_data, recwarn):
    if not training.bf16_supported(torch.device("cuda")):
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16")
    result = fit(run(MODELS["transformer-query"], precision="bf16"), tiny_data, seed=0, device="cuda")
    assert result.precision == "bf16"
    assert not [w for w in recwarn if "bf16" in str(w.message)]   # no fallback warning on a GPU that has it
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.test_pred.dtype == np.float32 and np.isfinite(result.test_pred).all()


def test_fit_on_cuda_leaves_no_memory_behind(tiny_data):
    """Worker processes run one job after another on a shared GPU: a finished run's tensors are freed,
    so the second of two runs leaves the GPU's allocations where the first left them (what stays is
    torch's per-process cuBLAS workspace and the like, made once)."""
    def allocated_after_a_run():
        result = fit(run(), tiny_data, seed=0, device="cuda")
        del result
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    assert allocated_after_a_run() == allocated_after_a_run()
