"""The model family: every variant builds, the default is the lab's model, masks ignore padding."""

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msa.config import MODALITIES, ConfigError, ModelConfig
from msa.models import ENCODERS, FUSIONS, build_model, count_parameters, real_steps, tracing_mode

DIMS = {"vision": 35, "text": 300, "audio": 74}
SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(MODALITIES, r)]


# --- the lab's models, copied from the seed ---------------------------------------------------------

class MultimodalSentimentAnalysisModel(nn.Module):
    def __init__(self):
        super(MultimodalSentimentAnalysisModel, self).__init__()  # noqa: UP008 (the lab's code, as written)
        self.vision_norm = nn.LayerNorm(35)
        self.text_norm = nn.LayerNorm(300)
        self.audio_norm = nn.LayerNorm(74)
        self.vision_fc = nn.Linear(35, 128)
        self.text_fc = nn.Linear(300, 128)
        self.audio_fc = nn.Linear(74, 128)
        self.vision_lstm = nn.LSTM(input_size=128, hidden_size=128, num_layers=1, dropout=0.1, batch_first=True)
        self.text_lstm = nn.LSTM(input_size=128, hidden_size=128, num_layers=1, dropout=0.1, batch_first=True)
        self.audio_lstm = nn.LSTM(input_size=128, hidden_size=128, num_layers=1, dropout=0.1, batch_first=True)
        self.mm_lstm = nn.LSTM(input_size=128, hidden_size=128, num_layers=1, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(128, 1)

    def forward(self, vision, text, audio):
        vision = self.vision_norm(vision)
        text = self.text_norm(text)
        audio = self.audio_norm(audio)
        vision = F.relu(self.vision_fc(vision))
        text = F.relu(self.text_fc(text))
        audio = F.relu(self.audio_fc(audio))
        output_v, (vision_h, _) = self.vision_lstm(vision)  # noqa: RUF059
        output_t, (text_h, _) = self.text_lstm(text)  # noqa: RUF059
        output_a, (audio_h, _) = self.audio_lstm(audio)  # noqa: RUF059
        feature = (vision_h[-1] + text_h[-1] + audio_h[-1]).unsqueeze(1)
        _, (fusion_tensor, _) = self.mm_lstm(feature)
        output = self.fc(fusion_tensor[-1])
        output = torch.sigmoid(output)
        output = output * 6 - 3
        return output


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=500):
        super(PositionalEncoding, self).__init__()  # noqa: UP008
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len).unsqueeze(1).float()
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-np.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        pe = pe.unsqueeze(0)
        self.register_buffer('pe', pe)

    def forward(self, x):
        x = x + self.pe[:, :x.size(1)]
        return x


class MultimodalSentimentAnalysisTransformerModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden_dim = 128
        self.num_layers = 1
        self.num_heads = 4
        self.vision_norm = nn.LayerNorm(35)
        self.text_norm = nn.LayerNorm(300)
        self.audio_norm = nn.LayerNorm(74)
        self.vision_fc = nn.Linear(35, self.hidden_dim)
        self.text_fc = nn.Linear(300, self.hidden_dim)
        self.audio_fc = nn.Linear(74, self.hidden_dim)
        self.pe = PositionalEncoding(self.hidden_dim)
        encoder_layer = nn.TransformerEncoderLayer(d_model=self.hidden_dim, nhead=self.num_heads, dim_feedforward=256, dropout=0.1, batch_first=True)  # noqa: E501
        self.vision_transformer = nn.TransformerEncoder(encoder_layer, num_layers=self.num_layers)
        self.text_transformer = nn.TransformerEncoder(encoder_layer, num_layers=self.num_layers)
        self.audio_transformer = nn.TransformerEncoder(encoder_layer, num_layers=self.num_layers)
        self.mm_transformer = nn.TransformerEncoder(encoder_layer, num_layers=self.num_layers)
        self.fc = nn.Linear(self.hidden_dim, 1)

    def forward(self, vision, text, audio):
        vision = self.vision_norm(vision)
        text = self.text_norm(text)
        audio = self.audio_norm(audio)
        vision = self.pe(F.relu(self.vision_fc(vision)))
        text = self.pe(F.relu(self.text_fc(text)))
        audio = self.pe(F.relu(self.audio_fc(audio)))
        vision_feat = self.vision_transformer(vision).mean(dim=1)
        text_feat = self.text_transformer(text).mean(dim=1)
        audio_feat = self.audio_transformer(audio).mean(dim=1)
        fused = vision_feat + text_feat + audio_feat
        fused = fused.unsqueeze(1)
        fusion_tensor = self.mm_transformer(fused).squeeze(1)
        output = self.fc(fusion_tensor)
        output = torch.sigmoid(output)
        output = output * 6 - 3
        return output


def lab_to_ours(lab_state: dict) -> dict:
    """Rename the lab's state_dict keys to ours: `text_fc.weight` -> `proj.text.weight`, etc."""
    out = {}
    for key, value in lab_state.items():
        first, rest = key.split(".", 1)
        if first == "pe":
            continue  # our positional table is not persistent: it is a function of the shape
        if first == "fc":
            out[f"head.{rest}"] = value
        elif first in ("mm_lstm", "mm_transformer"):
            out[f"fusion.{first[3:]}.{rest}"] = value
        else:
            modality, part = first.split("_")
            prefix = {"norm": "norm", "fc": "proj"}.get(part, f"encoders.{modality}.{part}")
            out[f"{prefix}.{modality}.{rest}" if part in ("norm", "fc") else f"{prefix}.{rest}"] = value
    return out


def lab_with_warnings_silenced(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lab's 1-layer LSTM(dropout=0.1) warns
        return cls()


def front_padded(batch: int = 6, steps: int = 50, seed: int = 0, min_pad: int = 0) -> list[torch.Tensor]:
    """Random features for each modality, zero-padded at the front like the real files."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, steps, d, generator=g) for d in DIMS.values()]
    for i in range(batch):
        pad = int(torch.randint(min_pad, steps - 1, (1,), generator=g))
        for x in xs:
            x[i, :pad] = 0
    return xs


# --- the default is the lab's baseline --------------------------------------------------------------

def test_default_has_the_lab_parameter_count_and_builds_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the lab's LSTM(num_layers=1, dropout=0.1) would warn here
        model = build_model(ModelConfig(), DIMS)
    assert count_parameters(model) == 582_067
    assert count_parameters(lab_with_warnings_silenced(MultimodalSentimentAnalysisModel)) == 582_067
    assert model.modalities == ("vision", "text", "audio")


@pytest.mark.parametrize("min_pad", [0, 20], ids=["some-rows-unpadded", "all-rows-padded"])
def test_default_computes_the_lab_function_and_gradients(min_pad):
    lab = lab_with_warnings_silenced(MultimodalSentimentAnalysisModel)
    ours = build_model(ModelConfig(), DIMS)
    ours.load_state_dict(lab_to_ours(lab.state_dict()))
    xs = front_padded(batch=8, min_pad=min_pad)  # all-rows-padded: the shared-padding shortcut runs
    expected, got = lab(*xs).view(-1), ours(*xs)
    assert got.shape == (8,)
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    lab_grads = lab_to_ours({k: p.grad for k, p in lab.named_parameters()})
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, lab_grads[name], msg=name)


def test_seeded_default_starts_from_the_lab_weights():
    torch.manual_seed(123)
    lab = lab_with_warnings_silenced(MultimodalSentimentAnalysisModel)
    torch.manual_seed(123)
    ours = build_model(ModelConfig(), DIMS)
    expected = lab_to_ours(lab.state_dict())
    got = ours.state_dict()
    assert sorted(got) == sorted(expected)
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_transformer_variant_computes_the_lab_transformer_function():
    lab = MultimodalSentimentAnalysisTransformerModel().eval()
    cfg = ModelConfig(encoder="transformer", pooling="mean", fusion="sum_transformer")
    ours = build_model(cfg, DIMS).eval()
    ours.load_state_dict(lab_to_ours(lab.state_dict()))
    assert count_parameters(ours) == count_parameters(lab) == 583_603
    xs = front_padded(steps=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(*xs), lab(*xs).view(-1))
    with torch.no_grad(), tracing_mode():  # the unfused path too
        torch.testing.assert_close(ours(*xs), lab(*xs).view(-1))


# --- every variant ----------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@pytest.mark.parametrize("mask_padding", [False, True])
def test_every_encoder_and_fusion_builds_without_warnings_and_backprops(encoder, fusion, mask_padding):
    cfg = ModelConfig(encoder=encoder, fusion=fusion, mask_padding=mask_padding, encoder_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(cfg, DIMS)
    xs = front_padded(batch=4, steps=9)
    out = model(*xs)
    assert out.shape == (4,)
    assert ((out > -3) & (out < 3)).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "a parameter is not in the graph"


@pytest.mark.parametrize("modalities", SUBSETS, ids="+".join)
@pytest.mark.parametrize("input_layernorm", [True, False])
def test_every_modality_subset_builds_and_takes_its_inputs_in_lab_order(modalities, input_layernorm):
    model = build_model(ModelConfig(modalities=modalities, input_layernorm=input_layernorm), DIMS)
    assert model.modalities == modalities
    xs = dict(zip(DIMS, front_padded(batch=3, steps=7)))
    assert model(*(xs[m] for m in modalities)).shape == (3,)
    norm_params = sum(2 * DIMS[m] for m in modalities) if input_layernorm else 0
    lstm = 4 * 128 * (128 + 128) + 2 * 4 * 128
    expected = norm_params + sum(DIMS[m] * 128 + 128 for m in modalities) + (len(modalities) + 1) * lstm + 129
    assert count_parameters(model) == expected


def test_dims_come_from_the_data_not_from_the_lab():
    model = build_model(ModelConfig(), {"vision": 20, "text": 768, "audio": 5})  # MMSA's layout
    assert model(torch.randn(2, 5, 20), torch.randn(2, 5, 768), torch.randn(2, 5, 5)).shape == (2,)


def test_wrong_number_of_inputs_is_refused_by_name():
    model = build_model(ModelConfig(modalities=("text",)), DIMS)
    with pytest.raises(AssertionError, match=r"expected 1 inputs \('text',\), got 3"):
        model(*front_padded(batch=2, steps=5))


def test_registries_hold_exactly_the_names_the_config_allows():
    fusion_check, _ = ModelConfig._CONSTRAINTS["fusion"]
    encoder_check, _ = ModelConfig._CONSTRAINTS["encoder"]
    assert all(fusion_check(name) for name in FUSIONS) and not fusion_check("concat")
    assert all(encoder_check(name) for name in ENCODERS) and not encoder_check("gru")
    assert {"sum_lstm", "sum_transformer", "self_attention", "query_attention"} <= set(FUSIONS)
    assert {"lstm", "transformer"} <= set(ENCODERS)


def test_a_registered_component_declares_its_own_constraints():
    # sum_transformer's attention needs hidden % heads == 0 as much as the attention fusions do
    with pytest.raises(ConfigError, match="'hidden' parameter of ModelConfig must be divisible by 'heads'"):
        ModelConfig(fusion="sum_transformer", hidden=10, heads=4)
    ModelConfig(fusion="sum_lstm", hidden=10, heads=4)  # no attention anywhere: any heads will do


def test_config_validation_messages():
    with pytest.raises(ConfigError) as e:
        ModelConfig(dropout=1.5)
    assert str(e.value) == ("The 'dropout' parameter of ModelConfig must be a float in the range [0, 1). "
                            "Got 1.5 instead.")
    with pytest.raises(ConfigError,
                       match="'encoder' parameter of ModelConfig must be one of 'lstm', 'packed_lstm', 'transformer'"):
        ModelConfig(encoder="gru")
    with pytest.raises(ConfigError, match=r"Unknown parameter\(s\) \['hiden'\] for ModelConfig"):
        ModelConfig.from_dict({"hiden": 64})


# --- padding masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder,pooling", [("lstm", "last"), ("lstm", "mean"),
                                             ("transformer", "mean"), ("transformer", "last")])
def test_masked_models_ignore_how_much_front_padding_there_is(encoder, pooling):
    torch.manual_seed(0)
    cfg = ModelConfig(encoder=encoder, pooling=pooling, mask_padding=True, fusion="query_attention")
    model = build_model(cfg, DIMS).eval()
    real = [torch.randn(3, 6, d) for d in DIMS.values()]  # 3 rows, 6 real steps each

    def padded(lead: int):
        return [torch.cat([torch.zeros(3, lead, x.shape[-1]), x], dim=1) for x in real]

    with torch.no_grad():
        bare = model(*real)
        torch.testing.assert_close(model(*padded(2)), bare)
        torch.testing.assert_close(model(*padded(9)), bare)

    # and the test can fail: without the mask, padding changes the output
    unmasked = build_model(ModelConfig(encoder=encoder, pooling=pooling, fusion="query_attention"), DIMS).eval()
    unmasked.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(unmasked(*padded(9)), unmasked(*real))


@pytest.mark.parametrize("encoder,pooling", [("lstm", "last"), ("lstm", "mean"),
                                             ("transformer", "mean"), ("transformer", "last")])
def test_a_batch_of_differently_padded_rows_matches_each_row_alone(encoder, pooling):
    torch.manual_seed(1)
    model = build_model(ModelConfig(encoder=encoder, pooling=pooling, mask_padding=True), DIMS).eval()
    xs = front_padded(batch=5, steps=12, seed=3)
    with torch.no_grad():
        together = model(*xs)
        for i in range(5):
            lead = int((~real_steps(xs[1][i:i + 1])).sum())  # the text row's padding, shared by all
            alone = model(*(x[i:i + 1, lead:] for x in xs))
            torch.testing.assert_close(together[i:i + 1], alone)


def test_rows_without_any_real_step_give_finite_outputs_and_gradients():
    for encoder, pooling in [("lstm", "last"), ("lstm", "mean"), ("transformer", "mean"), ("transformer", "last")]:
        model = build_model(ModelConfig(encoder=encoder, pooling=pooling, mask_padding=True), DIMS)
        xs = front_padded(batch=3, steps=8)
        for x in xs:
            x[0] = 0
        out = model(*xs)
        out.sum().backward()
        assert torch.isfinite(out).all(), (encoder, pooling)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()), (encoder, pooling)
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(*xs)).all(), (encoder, pooling)


@pytest.mark.parametrize("pooling,layers,mode", [("last", 1, "train"), ("mean", 1, "train"), ("last", 2, "eval")])
def test_computing_the_shared_padding_once_changes_nothing(pooling, layers, mode):
    """Unmasked LSTMs compute the padding every row of a batch shares once; adding one unpadded row
    to the batch turns that off, and must not change the other rows' outputs or gradients."""
    torch.manual_seed(2)
    model = build_model(ModelConfig(pooling=pooling, encoder_layers=layers), DIMS).train(mode == "train")
    padded = front_padded(batch=4, steps=16, seed=4, min_pad=6)  # every row pads >= 6 steps
    unpadded = front_padded(batch=1, steps=16, seed=5)
    for x in unpadded:
        x[0] = torch.randn(x.shape[1:])
    shortcut = model(*padded)
    plain = model(*(torch.cat([x, u]) for x, u in zip(padded, unpadded)))[:4]
    torch.testing.assert_close(shortcut, plain)
    grads = [torch.autograd.grad(out.square().sum(), list(model.parameters())) for out in (shortcut, plain)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    if layers > 1:  # in training, dropout between layers must draw a mask per row: no shortcut
        assert not model.train().encoders["text"].takes_shared_prefix


def test_real_steps_marks_all_zero_steps_as_padding():
    x = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [2.0, 0.0]],
                      [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    assert real_steps(x).tolist() == [[False, True, True], [False, False, True]]


# --- tracing (TensorBoard's graph) ------------------------------------------------------------------

@pytest.mark.parametrize("encoder,fusion", [("lstm", "sum_lstm"), ("transformer", "sum_transformer"),
                                            ("transformer", "query_attention"), ("lstm", "self_attention")])
def test_models_trace_inside_tracing_mode(encoder, fusion):
    model = build_model(ModelConfig(encoder=encoder, fusion=fusion, pooling="mean"), DIMS).eval()
    xs = tuple(front_padded(batch=2, steps=6))
    before = torch.backends.mha.get_fastpath_enabled()
    with tracing_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace: what add_graph uses
        traced = torch.jit.trace(model, xs, check_trace=False)
        with torch.no_grad():
            torch.testing.assert_close(traced(*xs), model(*xs))
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_tensorboard_add_graph_works_for_the_transformer_variant(tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    model = build_model(ModelConfig(encoder="transformer", fusion="sum_transformer", pooling="mean"), DIMS)
    writer = tensorboard.SummaryWriter(str(tmp_path))
    try:
        with tracing_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace, still what add_graph uses
            writer.add_graph(model, tuple(front_padded(batch=2, steps=6)))
    finally:
        writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["graph"]
    ops = {node.op for node in events.Graph().node}
    assert any("linear" in op.lower() for op in ops), sorted(ops)[:20]
