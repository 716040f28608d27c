"""The field's components in the model family (TFN, LMF, cross-modal attention, bidirectional and packed
LSTMs, attention pooling), each against a slow, obvious reference written with numpy loops."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from msa.config import ModelConfig
from msa.models import (
    ENCODERS,
    FUSIONS,
    AttentionPooling,
    build_model,
    count_parameters,
    real_steps,
    relative_cost,
    tracing_mode,
)

DIMS = {"vision": 35, "text": 300, "audio": 74}
NEW = {  # each new component or option, with its parameter count at the default hidden 128, 3 modalities
    "tfn": ({"fusion": "tfn"}, 1_085_155),
    "lmf": ({"fusion": "lmf"}, 648_247),
    "crossmodal": ({"fusion": "crossmodal"}, 1_344_819),
    "bilstm": ({"bidirectional": True}, 483_763),
    "packed_lstm": ({"encoder": "packed_lstm"}, 582_067),
    "packed_bilstm": ({"encoder": "packed_lstm", "bidirectional": True}, 483_763),
    "attention_pooling": ({"pooling": "attention"}, 582_451),
}


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def front_padded(batch: int = 5, steps: int = 9, seed: int = 0) -> list[torch.Tensor]:
    """Features zero-padded at the front like the real files, a different amount per row, and one row unpadded."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, steps, d, generator=g) for d in DIMS.values()]
    for i in range(1, batch):
        pad = int(torch.randint(1, steps - 1, (1,), generator=g))
        for x in xs:
            x[i, :pad] = 0
    return xs


def random_real(batch: int, steps: int, g: torch.Generator) -> torch.Tensor:
    """(B, T) real steps after a front padding of random length; every row keeps at least one."""
    pads = torch.randint(0, steps, (batch,), generator=g)
    return torch.arange(steps) >= pads.unsqueeze(1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# --- TFN and LMF ------------------------------------------------------------------------------------

def tfn_reference(fusion, vectors: list[torch.Tensor]) -> np.ndarray:
    """Per row: z_m = (W_m v_m + b_m; 1), every product z_1[i] z_2[j] ... in row-major order, then W z + b."""
    downs = [(np64(d.weight), np64(d.bias)) for d in fusion.down.values()]
    rows = []
    for b in range(vectors[0].shape[0]):
        zs = [np.append(W @ np64(v[b]) + bias, 1.0) for (W, bias), v in zip(downs, vectors)]
        indices = itertools.product(*(range(len(z)) for z in zs))  # row-major: the last index runs fastest
        terms = [math.prod(z[i] for z, i in zip(zs, index)) for index in indices]
        rows.append(np64(fusion.out.weight) @ np.array(terms) + np64(fusion.out.bias))
    return np.stack(rows)


@pytest.mark.parametrize("modalities", [("vision", "text", "audio"), ("text", "audio")])
def test_tfn_is_the_outer_product_of_the_vectors_each_with_a_one_appended(modalities):
    torch.manual_seed(0)
    cfg = ModelConfig(modalities=modalities, hidden=6, fusion_dim=3)
    fusion = FUSIONS["tfn"](cfg).double()
    assert fusion.out.in_features == 4 ** len(modalities)
    vectors = [torch.randn(4, 6, dtype=torch.float64) for _ in modalities]
    assert_allclose(np64(fusion(vectors)), tfn_reference(fusion, vectors), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("modalities,rank", [(("vision", "text", "audio"), 3), (("vision", "audio"), 1)])
def test_lmf_equals_tfn_with_the_equivalent_low_rank_weight(modalities, rank):
    """The LMF paper's identity: W = sum_r w_r (W_1^(r) outer W_2^(r) outer ...), so W (z_1 outer z_2 ...) is
    sum_r w_r prod_m (z_m W_m^(r)), the outer product never formed."""
    torch.manual_seed(1)
    H = 5
    cfg = ModelConfig(modalities=modalities, hidden=H, fusion_dim=H, rank=rank)
    lmf, tfn = FUSIONS["lmf"](cfg).double(), FUSIONS["tfn"](cfg).double()
    with torch.no_grad():
        for p in lmf.parameters():  # away from the init (rows of 1, equal rank weights, zero bias)
            p.add_(0.3 * torch.randn_like(p))
        for down in tfn.down.values():  # TFN's projection as the identity: both read the same vectors
            down.weight.copy_(torch.eye(H, dtype=torch.float64))
            down.bias.zero_()
        letters = "ijkl"[:len(modalities)]
        factors = list(lmf.factors.values())  # each (H + 1, r, H)
        W = torch.einsum(f"r,{','.join(c + 'rh' for c in letters)}->h{letters}", lmf.rank_weights, *factors)
        tfn.out.weight.copy_(W.reshape(H, -1))
        tfn.out.bias.copy_(lmf.bias)
    vectors = [torch.randn(6, H, dtype=torch.float64) for _ in modalities]
    assert_allclose(np64(lmf(vectors)), np64(tfn(vectors)), rtol=1e-10, atol=1e-12)
    assert_allclose(np64(tfn(vectors)), tfn_reference(tfn, vectors), rtol=1e-10, atol=1e-12)


# --- cross-modal attention --------------------------------------------------------------------------

def layer_norm(x: np.ndarray, norm) -> np.ndarray:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + norm.eps) * np64(norm.weight) + np64(norm.bias)


def attention_reference(attn, queries: np.ndarray, keys: np.ndarray, heads: int) -> np.ndarray:
    """One row: every query step attends to every key step (the real ones only), head by head."""
    H = queries.shape[-1]
    Wq, Wk, Wv = np.split(np64(attn.in_proj_weight), 3)
    bq, bk, bv = np.split(np64(attn.in_proj_bias), 3)
    q, k, v = queries @ Wq.T + bq, keys @ Wk.T + bk, keys @ Wv.T + bv
    d = H // heads
    out = np.zeros_like(q)
    for t in range(len(q)):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            weights = softmax(np.array([q[t, cols] @ k[s, cols] / math.sqrt(d) for s in range(len(k))]))
            out[t, cols] = sum(w * v[s, cols] for s, w in enumerate(weights))
    return out @ np64(attn.out_proj.weight).T + np64(attn.out_proj.bias)


def block_reference(block, target: np.ndarray, source: np.ndarray, heads: int) -> np.ndarray:
    x = target + attention_reference(block.attn, layer_norm(target, block.norm_target),
                                     layer_norm(source, block.norm_source), heads)
    first, last = block.ff[0], block.ff[3]
    hidden = np.maximum(layer_norm(x, block.norm_ff) @ np64(first.weight).T + np64(first.bias), 0)
    return x + hidden @ np64(last.weight).T + np64(last.bias)


def pool_reference(x: np.ndarray, how: str, attention=None) -> np.ndarray:
    """One row's real steps (T, D) -> (D,)."""
    if how == "last":
        return x[-1]
    if how == "mean":
        return x.mean(0)
    weights = softmax(x @ np64(attention.query.weight)[0])
    return sum(w * step for w, step in zip(weights, x))


def crossmodal_reference(fusion, sequences, heads: int) -> np.ndarray:
    mods = fusion.modalities
    rows = []
    for b in range(sequences[0][0].shape[0]):
        real = {m: (np.ones(x.shape[1], bool) if r is None else r[b].numpy()) for m, (x, r) in zip(mods, sequences)}
        steps = {m: np64(x[b])[real[m]] for m, (x, _) in zip(mods, sequences)}  # each row's real steps only
        pooled = []
        for t in mods:
            crossed = np.concatenate([block_reference(fusion.blocks[f"{s}_to_{t}"], steps[t], steps[s], heads)
                                      for s in mods if s != t], axis=-1)
            pooled.append(pool_reference(crossed, fusion.pooling, fusion.attention[t] if fusion.attention else None))
        rows.append(np64(fusion.out.weight) @ np.concatenate(pooled) + np64(fusion.out.bias))
    return np.stack(rows)


@pytest.mark.parametrize("pooling", ["last", "mean", "attention"])
@pytest.mark.parametrize("masked", [True, False])
def test_crossmodal_fusion_matches_the_reference(pooling, masked):
    torch.manual_seed(2)
    cfg = ModelConfig(hidden=8, heads=2, ff_dim=12, pooling=pooling, fusion="crossmodal")
    fusion = FUSIONS["crossmodal"](cfg).double().eval()
    assert len(fusion.blocks) == 6
    g = torch.Generator().manual_seed(3)
    sequences = []
    for T in (4, 6, 3):  # each modality its own length: attention does not need them aligned
        x = torch.randn(3, T, 8, generator=g, dtype=torch.float64)
        real = random_real(3, T, g) if masked else None
        if masked:
            x[~real] = float("nan")  # a padded step may hold anything: it must not reach a real one
        sequences.append((x, real))
    with torch.no_grad():
        got = fusion(sequences)
    assert_allclose(np64(got), crossmodal_reference(fusion, sequences, heads=2), rtol=1e-9, atol=1e-10)


# --- encoders: bidirectional, packed, attention pooling ---------------------------------------------

def lstm_reference(lstm, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row's steps (T, H) through the LSTM's equations, step by step, layer by layer, both directions
    when bidirectional -> every step's output (T, directions * h) and the last layer's final state."""
    def run(steps, suffix):
        W_ih, W_hh = np64(getattr(lstm, f"weight_ih_{suffix}")), np64(getattr(lstm, f"weight_hh_{suffix}"))
        bias = np64(getattr(lstm, f"bias_ih_{suffix}")) + np64(getattr(lstm, f"bias_hh_{suffix}"))
        h = c = np.zeros(lstm.hidden_size)
        out = []
        for step in steps:
            i, f, g, o = np.split(W_ih @ step + W_hh @ h + bias, 4)
            sigmoid = lambda a: 1 / (1 + np.exp(-a))
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            out.append(h)
        return np.stack(out)

    for layer in range(lstm.num_layers):
        forward = run(x, f"l{layer}")
        if not lstm.bidirectional:
            x, final = forward, forward[-1]
            continue
        backward = run(x[::-1], f"l{layer}_reverse")[::-1]  # read from the last step back to the first
        x, final = np.concatenate([forward, backward], -1), np.concatenate([forward[-1], backward[0]])
    return x, final


@pytest.mark.parametrize("encoder,bidirectional,masked", [
    ("lstm", True, False),         # both directions over the whole sequence, padding read (the lab's way)
    ("lstm", True, True),          # masked: each direction over the real steps only
    ("packed_lstm", False, True),
    ("packed_lstm", True, True),
])
@pytest.mark.parametrize("pooling,layers", [("last", 1), ("mean", 2), ("attention", 1)])
def test_lstm_encoders_match_the_reference(encoder, bidirectional, masked, pooling, layers):
    torch.manual_seed(4)
    cfg = ModelConfig(encoder=encoder, bidirectional=bidirectional, hidden=6, encoder_layers=layers, pooling=pooling)
    module = ENCODERS[encoder](cfg).double().eval()
    assert module.lstm.bidirectional == bidirectional
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, 6, generator=g, dtype=torch.float64)
    real = random_real(4, 7, g) if masked else None
    with torch.no_grad():
        got = module(x, real)
        steps, steps_real = module.steps(x, real)
    assert got.shape == (4, 6) and steps.shape[-1] == 6
    for b in range(4):
        row = np64(x[b]) if real is None else np64(x[b])[real[b].numpy()]
        outputs, final = lstm_reference(module.lstm, row)
        expected = final if pooling == "last" else pool_reference(outputs, pooling, module.attention)
        assert_allclose(np64(got[b]), expected, rtol=1e-9, atol=1e-10, err_msg=f"row {b}")
        real_outputs = np64(steps[b]) if steps_real is None else np64(steps[b])[steps_real[b].numpy()]
        assert_allclose(real_outputs, outputs, rtol=1e-9, atol=1e-10, err_msg=f"row {b}")


def test_a_packed_lstm_needs_the_real_steps():
    module = ENCODERS["packed_lstm"](ModelConfig(encoder="packed_lstm", hidden=4))
    with pytest.raises(AssertionError, match="needs the real steps"):
        module(torch.randn(2, 3, 4), None)


def test_packing_computes_what_moving_the_real_steps_to_the_front_does():
    """`lstm` with mask_padding moves each row's real steps to the front (fast on CPU); `packed_lstm`
    packs them, whatever mask_padding says: the same function, the same parameters."""
    torch.manual_seed(6)
    moved = build_model(ModelConfig(mask_padding=True, pooling="mean"), DIMS).eval()
    packed = build_model(ModelConfig(encoder="packed_lstm", pooling="mean"), DIMS).eval()
    packed.load_state_dict(moved.state_dict())
    xs = front_padded(batch=6, steps=11)
    with torch.no_grad():
        torch.testing.assert_close(packed(*xs), moved(*xs))


@pytest.mark.parametrize("masked", [True, False])
def test_attention_pooling_matches_the_reference(masked):
    torch.manual_seed(7)
    pooling = AttentionPooling(5).double()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    real = random_real(4, 6, g) if masked else None
    if masked:
        x[~real] = float("nan")
    got = np64(pooling(x, real))
    for b in range(4):
        row = np64(x[b]) if real is None else np64(x[b])[real[b].numpy()]
        assert_allclose(got[b], pool_reference(row, "attention", pooling), rtol=1e-10, atol=1e-12)


def test_attention_pooling_of_the_lab_lstm_keeps_the_shared_padding_shortcut():
    """Unmasked, the LSTM computes the padding every row shares once; attention pooling reads it too."""
    torch.manual_seed(9)
    model = build_model(ModelConfig(pooling="attention"), DIMS)
    assert model.encoders["text"].takes_shared_prefix
    padded = front_padded(batch=4, steps=12, seed=10)
    for x in padded:
        x[:, :3] = 0  # every row pads its first 3 steps
    unpadded = [torch.randn(1, 12, d) for d in DIMS.values()]
    shortcut = model(*padded)
    plain = model(*(torch.cat([x, u]) for x, u in zip(padded, unpadded)))[:4]
    torch.testing.assert_close(shortcut, plain)


# --- in the model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_each_new_component_builds_backprops_and_has_its_parameter_count(name):
    values, parameters = NEW[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(ModelConfig(**values), DIMS)
    assert count_parameters(model) == parameters
    out = model(*front_padded())
    assert out.shape == (5,) and ((out > -3) & (out < 3)).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "a parameter is not in the graph"


@pytest.mark.parametrize("values", [
    {"fusion": "crossmodal", "mask_padding": True},
    {"fusion": "crossmodal", "mask_padding": True, "encoder": "transformer", "pooling": "attention"},
    {"encoder": "packed_lstm"},  # reads real steps only, whatever mask_padding says
    {"encoder": "packed_lstm", "bidirectional": True, "pooling": "mean", "fusion": "lmf"},
    {"bidirectional": True, "mask_padding": True, "pooling": "attention", "fusion": "tfn"},
])
def test_padding_aware_variants_ignore_front_padding_and_batch_mates(values):
    torch.manual_seed(11)
    model = build_model(ModelConfig(**values), DIMS).eval()
    real = [torch.randn(3, 6, d) for d in DIMS.values()]
    with torch.no_grad():
        bare = model(*real)
        for lead in (2, 9):
            padded = [torch.cat([torch.zeros(3, lead, x.shape[-1]), x], dim=1) for x in real]
            torch.testing.assert_close(model(*padded), bare)
        xs = front_padded(batch=5, steps=12, seed=12)
        together = model(*xs)
        for i in range(5):
            lead = int((~real_steps(xs[1][i:i + 1])).sum())
            torch.testing.assert_close(together[i:i + 1], model(*(x[i:i + 1, lead:] for x in xs)))


@pytest.mark.parametrize("name", ["crossmodal", "packed_bilstm", "attention_pooling"])
def test_rows_without_any_real_step_give_finite_outputs_and_gradients(name):
    model = build_model(ModelConfig(**NEW[name][0], mask_padding=True), DIMS)
    xs = front_padded(batch=3, steps=8)
    for x in xs:
        x[0] = 0
    out = model(*xs)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", NEW)
def test_new_components_trace_inside_tracing_mode(name):
    model = build_model(ModelConfig(**NEW[name][0], mask_padding=name != "bilstm"), DIMS).eval()
    xs = tuple(front_padded(batch=2, steps=6))
    with tracing_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings; torch.jit.trace's deprecation
        traced = torch.jit.trace(model, xs, check_trace=False)
        with torch.no_grad():
            torch.testing.assert_close(traced(*xs), model(*xs))


def test_components_declare_their_cost():
    assert relative_cost(ModelConfig()) == 3.0  # the baseline: 3 modalities x 1 LSTM layer
    assert relative_cost(ModelConfig(encoder="packed_lstm")) == pytest.approx(3 * ENCODERS["packed_lstm"].cost)
    assert relative_cost(ModelConfig(fusion="crossmodal")) == pytest.approx(3 + FUSIONS["crossmodal"].cost)
    assert all(getattr(FUSIONS[name], "cost", 0.0) == 0.0
               for name in ("sum_lstm", "sum_transformer", "self_attention", "query_attention"))
