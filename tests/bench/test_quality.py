"""Quality suite: planning, the tiny transformer, metrics, and runs on the tiny preset."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from attnlab import Causal, Neighborhood, registry
from attnlab.bench import quality
from attnlab.bench.models import TinyTransformer
from attnlab.bench.quality import QualityRun, TASKS, evaluate, load_data, plan_quality, run_quality, train
from attnlab.scores import ALiBi, RelativeEmbedding

RESULT_KEYS = {"status", "reason", "metric", "value", "higher_is_better", "train_s", "params",
               "final_train_loss"}
CONFIG_KEYS = {"suite", "task", "variant", "mechanism", "seed", "preset", "steps", "layers", "dim",
               "heads", "seq_len", "batch_size", "lr"}
OPTIONAL = {"digits": "sklearn", "bach_chorales": "music21"}


def check_result(result: dict) -> None:
    """Keys, plain JSON types, strict JSON (no NaN)."""
    assert set(result) == RESULT_KEYS
    json.dumps(result, allow_nan=False)
    assert result["status"] in ("ok", "error", "not installed")
    assert result["metric"] in ("accuracy", "nll")
    assert result["higher_is_better"] is (result["metric"] == "accuracy")
    assert type(result["train_s"]) is float and type(result["params"]) is int
    for k in ("value", "final_train_loss"):
        assert result[k] is None or type(result[k]) is float
    assert (result["reason"] is None) is (result["status"] == "ok")


# ---------------------------------------------------------------- planning


def test_default_plan_covers_every_task_variant_and_seed():
    plan = plan_quality()
    expected = [
        (task, v.name, seed)
        for task, spec in TASKS.items()
        for seed in spec.presets["quick"].seeds
        for v in spec.variants
    ]
    assert [(r.task, r.variant, r.seed) for r in plan] == expected
    assert {r.preset for r in plan} == {"quick"}
    assert {r.variant for r in plan if r.task == "mqar"} == {"full", "sliding_window", "alibi"}
    assert {r.variant for r in plan if r.task == "digits"} == {"full", "neighborhood", "blocked"}
    assert {r.variant for r in plan if r.task == "bach_chorales"} == {"absolute", "relative"}
    assert {r.mechanism for r in plan} <= {m.name for m in registry.catalog()}


def test_keys_are_unique_and_stable():
    plan = plan_quality(preset="full")
    keys = [r.key for r in plan]
    assert len(set(keys)) == len(keys) == len(plan)
    assert keys == [r.key for r in plan_quality(preset="full")]
    run = QualityRun("mqar", "sliding_window", "sliding_window", 2, "quick")
    assert run.key == "quality|mqar|sliding_window|seed=2|quick"
    assert len({r.seed for r in plan if r.task == "mqar"}) == 3


def test_selection_seeds_and_preset_reach_the_config():
    plan = plan_quality(tasks="digits", variants=["blocked"], seeds=[5, 7], preset="full")
    assert [(r.variant, r.seed) for r in plan] == [("blocked", 5), ("blocked", 7)]
    config = plan[1].config()
    assert set(config) == CONFIG_KEYS
    json.dumps(config, allow_nan=False)
    preset = TASKS["digits"].presets["full"]
    assert config["suite"] == "quality" and config["seed"] == 7 and config["preset"] == "full"
    assert config["mechanism"] == "blocked"
    assert (config["steps"], config["dim"], config["lr"]) == (preset.steps, preset.dim, preset.lr)
    assert plan_quality(tasks=["mqar"], seeds=[1])[0].config()["steps"] == TASKS["mqar"].presets["quick"].steps


def test_a_variant_name_selects_it_in_the_tasks_that_have_it():
    plan = plan_quality(variants="full", seeds=[0])
    assert [(r.task, r.variant) for r in plan] == [
        ("mqar", "full"), ("selective_copy", "full"), ("digits", "full")
    ]
    assert [r.variant for r in plan_quality(tasks="bach_chorales", variants=["relative"])] == ["relative"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks=["mqar", "nope"]), r"'nope'.*mqar"),
        (dict(tasks="mqar", variants=["relative"]), r"'relative'.*sliding_window"),
        (dict(preset="huge"), r"'huge'.*tiny"),
        (dict(seeds=[-1]), r"seeds=-1"),
        (dict(seeds=[1, 1]), r"distinct"),
        (dict(tasks=["mqar", "mqar"]), r"distinct"),
        (dict(variants=[]), r"non-empty"),
    ],
)
def test_unknown_or_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_quality(**kwargs)


def test_argument_types_are_checked():
    with pytest.raises(TypeError, match="preset"):
        plan_quality(preset=1)
    with pytest.raises(TypeError, match="seeds"):
        plan_quality(seeds=[0.5])
    with pytest.raises(TypeError, match="QualityRun"):
        run_quality("quality|mqar|full|seed=0|tiny")


# ---------------------------------------------------------------- model


def test_language_model_gives_per_position_logits():
    model = TinyTransformer(11, 16, dim=16, heads=2, layers=2, pattern=Causal())
    out = model(torch.randint(0, 11, (3, 16)))
    assert out.shape == (3, 16, 11)
    assert model(torch.randint(0, 11, (3, 9))).shape == (3, 9, 11)  # shorter than max_len


def test_grid_classifier_pools_to_one_logit_row_per_image():
    model = TinyTransformer(17, 64, dim=16, heads=2, layers=1, num_classes=10,
                            pattern=Neighborhood(kernel_size=(3, 3)), grid=(8, 8))
    assert model(torch.randint(0, 17, (5, 64))).shape == (5, 10)
    with pytest.raises(ValueError, match="grid"):
        TinyTransformer(17, 60, dim=16, heads=2, grid=(8, 8))
    with pytest.raises(ValueError, match="dim"):
        TinyTransformer(17, 64, dim=15, heads=2)
    with pytest.raises(TypeError, match="make_score_mod"):
        TinyTransformer(17, 64, dim=16, heads=2, make_score_mod=ALiBi(2))


def test_score_mod_parameters_are_registered_and_trained():
    model = TinyTransformer(
        13, 12, dim=16, heads=2, layers=2, pattern=Causal(), absolute_positions=False,
        make_score_mod=lambda: RelativeEmbedding(8, max_distance=12, num_heads=2),
    )
    tables = [name for name, _ in model.named_parameters() if name.endswith("score_mod.table")]
    assert tables == ["blocks.0.score_mod.table", "blocks.1.score_mod.table"]
    assert model.pos is None
    model(torch.randint(0, 13, (2, 12))).sum().backward()
    for block in model.blocks:
        grad = block.score_mod.table.grad
        assert grad is not None and grad.abs().sum() > 0


# ---------------------------------------------------------------- metrics and training


class Oracle(torch.nn.Module):
    """Logits ``weight * one_hot(answer)``; ``answer`` is returned by ``lookup(x)``."""

    def __init__(self, lookup, classes: int, weight: float = 1e4):
        super().__init__()
        self.lookup, self.classes, self.weight = lookup, classes, weight

    def forward(self, x):
        return self.weight * torch.nn.functional.one_hot(self.lookup(x), self.classes).float()


def test_metrics_skip_ignored_positions():
    data = load_data("mqar", "tiny", 0)
    table = {tuple(x.tolist()): y.clamp(min=0) for x, y in zip(data.test_inputs, data.test_targets)}
    perfect = Oracle(lambda x: torch.stack([table[tuple(r.tolist())] for r in x]), data.vocab_size)
    assert evaluate(perfect, data, "accuracy") == 1.0
    uniform = Oracle(lambda x: torch.zeros_like(x), data.vocab_size, weight=0.0)
    assert evaluate(uniform, data, "nll") == pytest.approx(math.log(data.vocab_size))
    with pytest.raises(ValueError, match="metric"):
        evaluate(perfect, data, "bleu")


def test_training_reduces_the_training_loss():
    data = load_data("selective_copy", "tiny", 0)
    torch.manual_seed(0)
    model = TinyTransformer(data.vocab_size, data.seq_len, dim=16, heads=2, layers=1, pattern=Causal())
    losses = train(model, data, steps=60, batch_size=8, lr=1e-2, seed=0)
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_non_finite_training_loss_raises():
    data = load_data("mqar", "tiny", 0)
    model = TinyTransformer(data.vocab_size, data.seq_len, dim=16, heads=2, layers=1)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="nan"):
        train(model, data, steps=3, batch_size=4, lr=1e-3, seed=0)


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("task", list(TASKS))
def test_tiny_runs_return_well_formed_ok_results(task):
    if task in OPTIONAL:
        pytest.importorskip(OPTIONAL[task])
    for run in plan_quality(tasks=[task], preset="tiny"):
        result = run_quality(run)
        check_result(result)
        assert result["status"] == "ok", result["reason"]
        assert result["params"] > 0 and result["final_train_loss"] > 0
        if result["metric"] == "accuracy":
            assert 0.0 <= result["value"] <= 1.0
        else:
            assert task == "bach_chorales" and result["value"] > 0


def test_runs_are_deterministic_and_data_is_cached():
    run = plan_quality(tasks="mqar", variants="alibi", preset="tiny")[0]
    assert load_data("mqar", "tiny", 0) is load_data("mqar", "tiny", 0)
    first, second = run_quality(run), run_quality(run)
    assert (first["value"], first["final_train_loss"]) == (second["value"], second["final_train_loss"])
    state = torch.random.get_rng_state()
    run_quality(run)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


@pytest.mark.parametrize("task, module, pip", [("digits", "sklearn", "scikit-learn"),
                                               ("bach_chorales", "music21", "music21")])
def test_missing_package_is_reported_not_raised(monkeypatch, task, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    result = run_quality(plan_quality(tasks=[task], preset="tiny")[0])
    check_result(result)
    assert result["status"] == "not installed" and result["value"] is None
    assert result["reason"] == f"needs {pip}: pip install {pip}"


def test_exception_in_training_becomes_an_error_result(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(quality, "train", boom)
    result = run_quality(plan_quality(tasks="mqar", preset="tiny")[0])
    check_result(result)
    assert result["status"] == "error" and result["reason"] == "RuntimeError: boom"
    assert result["value"] is None and result["params"] > 0


def test_nan_metric_and_unknown_task_become_error_results(monkeypatch):
    monkeypatch.setattr(quality, "evaluate", lambda *a, **k: float("nan"))
    result = run_quality(plan_quality(tasks="selective_copy", preset="tiny")[0])
    check_result(result)
    assert result["status"] == "error" and "nan" in result["reason"]
    result = run_quality(QualityRun("nope", "full", "full", 0, "tiny"))
    check_result(result)
    assert result["status"] == "error" and "nope" in result["reason"]
