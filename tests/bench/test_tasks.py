"""Quality-task data: shapes, ranges, determinism, targets, no train/test overlap."""

from __future__ import annotations

import sys

import pytest
import torch

from attnlab.bench.tasks import (
    IGNORE_INDEX,
    TaskData,
    bach_chorales,
    digits,
    mqar,
    selective_copy,
    split_indices,
)


def check_common(data: TaskData, n_train: int | None = None, n_test: int | None = None) -> None:
    """dtypes, shapes and ranges that every task promises."""
    for x, y in ((data.train_inputs, data.train_targets), (data.test_inputs, data.test_targets)):
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.dim() == 2 and x.shape[1] == data.seq_len
        assert int(x.min()) >= 0 and int(x.max()) < data.vocab_size
        if data.num_classes is None:
            assert y.shape == x.shape
            scored = y[y != data.ignore_index]
            assert scored.numel() > 0
            assert int(scored.min()) >= 0 and int(scored.max()) < data.vocab_size
        else:
            assert y.shape == x.shape[:1]
            assert int(y.min()) >= 0 and int(y.max()) < data.num_classes
    if n_train is not None:
        assert len(data.train_inputs) == n_train
    if n_test is not None:
        assert len(data.test_inputs) == n_test
    assert data.name in data.describe() and str(data.vocab_size) in data.describe()


def same(a: TaskData, b: TaskData) -> bool:
    names = ("train_inputs", "train_targets", "test_inputs", "test_targets")
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)


def no_shared_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not ({tuple(r) for r in a.tolist()} & {tuple(r) for r in b.tolist()})


# ---------------------------------------------------------------------------- MQAR


def test_mqar_shapes_ranges_and_targets():
    data = mqar(64, 40, 6, 50, seed=0, num_queries=4)
    check_common(data, 64, 16)
    assert data.num_classes is None and data.ignore_index == IGNORE_INDEX == -100
    half = 25
    for x, y in ((data.train_inputs, data.train_targets), (data.test_inputs, data.test_targets)):
        keys, values = x[:, 0:12:2], x[:, 1:12:2]
        assert keys.min() >= 1 and keys.max() < half and values.min() >= half
        assert all(len(set(r)) == 6 for r in keys.tolist())
        assert all(len(set(r)) == 6 for r in values.tolist())
        assert (y[:, :12] == -100).all()
        assert ((y != -100).sum(1) == 4).all()
        for row in range(len(x)):
            pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
            asked = [int(p) for p in (y[row] != -100).nonzero().flatten()]
            assert len({int(x[row, p]) for p in asked}) == 4  # distinct keys queried
            for p in asked:
                assert int(x[row, p]) in pairs and pairs[int(x[row, p])] == int(y[row, p])


def test_mqar_without_random_fill_and_default_queries():
    data = mqar(16, 32, 4, 20, seed=3, random_non_queries=False)
    x, y = data.train_inputs, data.train_targets
    assert ((y != -100).sum(1) == 4).all()
    rest = x[:, 8:][y[:, 8:] == -100]
    assert (rest == 0).all()


def test_mqar_determinism_and_disjoint_streams():
    a, b, c = (mqar(50, 24, 4, 64, seed=s) for s in (7, 7, 8))
    assert same(a, b) and not same(a, c)
    assert no_shared_rows(a.train_inputs, a.test_inputs)
    assert not torch.equal(a.train_inputs[: len(a.test_inputs)], a.test_inputs)


def test_mqar_redraws_test_rows_seen_in_train():
    # 24 distinct sequences at most: the test rows must avoid those drawn for train.
    data = mqar(20, 8, 2, 6, seed=0, random_non_queries=False, num_test_examples=3)
    assert no_shared_rows(data.train_inputs, data.test_inputs)
    with pytest.raises(ValueError, match="distinct"):
        mqar(300, 8, 2, 6, seed=0, random_non_queries=False)


@pytest.mark.parametrize(
    "args,kwargs,err,name",
    [
        ((8, 20, 6, 64), {}, ValueError, "seq_len"),
        ((8, 64, 6, 13), {}, ValueError, "vocab_size"),
        ((8, 64, 4, 64), {"num_queries": 5}, ValueError, "num_queries"),
        ((8, 64, 0, 64), {}, ValueError, "num_kv_pairs"),
        ((1.5, 64, 4, 64), {}, TypeError, "num_examples"),
        ((8, 64, 4, 64), {"power_a": 0.0}, ValueError, "power_a"),
        ((8, 64, 4, 64), {"num_test_examples": 0}, ValueError, "num_test_examples"),
    ],
)
def test_mqar_validation_names_the_argument(args, kwargs, err, name):
    with pytest.raises(err, match=name):
        mqar(*args, seed=0, **kwargs)


def test_mqar_seed_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="seed"):
        mqar(8, 64, 4, 64, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        mqar(8, 64, 4, 64, seed=1.0)


# ---------------------------------------------------------------------------- selective copying


def test_selective_copy_construction():
    data = selective_copy(40, 30, 5, 10, seed=0, num_test_examples=12)
    check_common(data, 40, 12)
    for x, y in ((data.train_inputs, data.train_targets), (data.test_inputs, data.test_targets)):
        region, outputs = x[:, :25], x[:, 25:]
        assert (outputs == 9).all()  # markers
        assert (y[:, :25] == -100).all()
        assert ((region != 0).sum(1) == 5).all()
        assert region.max() <= 8  # data tokens are 1..vocab-2, never the marker
        for row in range(len(x)):
            data_tokens = region[row][region[row] != 0]
            assert torch.equal(y[row, 25:], data_tokens)  # in order of position


def test_selective_copy_determinism_and_disjoint_streams():
    a, b, c = (selective_copy(30, 24, 4, 8, seed=s) for s in (1, 1, 2))
    assert same(a, b) and not same(a, c)
    assert no_shared_rows(a.train_inputs, a.test_inputs)


@pytest.mark.parametrize(
    "args,err,name",
    [
        ((8, 9, 5, 10), ValueError, "seq_len"),
        ((8, 20, 5, 2), ValueError, "vocab_size"),
        ((8, 20, 0, 10), ValueError, "num_tokens"),
        ((8, "20", 5, 10), TypeError, "seq_len"),
    ],
)
def test_selective_copy_validation_names_the_argument(args, err, name):
    with pytest.raises(err, match=name):
        selective_copy(*args, seed=0)


# ---------------------------------------------------------------------------- split helper


def test_split_indices_disjoint_cover_and_stratified():
    train, test = split_indices(10, 0.3, seed=0)
    assert len(test) == 3 and sorted(train.tolist() + test.tolist()) == list(range(10))
    assert torch.equal(split_indices(10, 0.3, seed=0)[1], test)
    labels = [0] * 8 + [1] * 12
    train, test = split_indices(20, 0.25, seed=4, strata=labels)
    assert sorted(labels[i] for i in test.tolist()) == [0, 0, 1, 1, 1]
    assert not set(train.tolist()) & set(test.tolist())
    for kwargs, name in (({"n": 1}, "n"), ({"test_fraction": 1.0}, "test_fraction")):
        with pytest.raises(ValueError, match=name):
            split_indices(**{"n": 10, "test_fraction": 0.2, "seed": 0, **kwargs})
    with pytest.raises(ValueError, match="strata"):
        split_indices(10, 0.2, 0, strata=[0, 1])


def test_taskdata_checks_dtypes_and_shapes():
    x = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="train_inputs"):
        TaskData("t", x.float(), x, x, x, vocab_size=2)
    with pytest.raises(ValueError, match="test_targets"):
        TaskData("t", x, x, x, x[:, :2], vocab_size=2)
    assert "3 train / 3 test" in TaskData("t", x, x[:, 0], x, x[:, 0], 2, 2).describe()


# ---------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_data() -> TaskData:
    pytest.importorskip("sklearn")
    return digits(seed=0)


def test_digits_shapes_split_and_stratification(digits_data):
    from sklearn.datasets import load_digits

    data = digits_data
    check_common(data)
    assert data.seq_len == 64 and data.vocab_size == 17 and data.num_classes == 10
    train, test = data.train_source.tolist(), data.test_source.tolist()
    assert not set(train) & set(test) and sorted(train + test) == list(range(1797))
    raw = load_digits()
    assert torch.equal(data.test_inputs, torch.as_tensor(raw.data[test]).long())
    assert torch.equal(data.train_targets, torch.as_tensor(raw.target[train]).long())
    counts = torch.bincount(torch.as_tensor(raw.target), minlength=10)
    test_counts = torch.bincount(data.test_targets, minlength=10)
    assert ((test_counts - counts * 0.25).abs() <= 1).all()


def test_digits_determinism(digits_data):
    assert same(digits(seed=0), digits_data)
    assert not torch.equal(digits(seed=1).test_source, digits_data.test_source)
    with pytest.raises(ValueError, match="test_fraction"):
        digits(seed=0, test_fraction=0.0)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits(seed=0)


# ---------------------------------------------------------------------------- Bach chorales


@pytest.fixture(scope="module")
def chorales_data() -> TaskData:
    pytest.importorskip("music21")
    return bach_chorales(seed=0, max_len=64, test_fraction=0.25, max_pieces=8)


def test_chorales_shapes_ranges_and_next_token_targets(chorales_data):
    from attnlab.bench.tasks import chorales

    data = chorales_data
    check_common(data)
    assert data.seq_len == 64 and data.vocab_size == chorales.VOCAB_SIZE == 53
    x, y = data.train_inputs, data.train_targets
    assert (y != chorales.PAD).all()  # padding is never a target
    inner = (y[:, :-1] != -100) & (x[:, 1:] != chorales.PAD)
    assert torch.equal(y[:, :-1][inner], x[:, 1:][inner])  # targets are the next tokens
    last = (y[:, :-1] != -100) & (x[:, 1:] == chorales.PAD)
    assert (y[:, :-1][last] == chorales.EOS).all()  # ... up to the end of the piece


def test_chorales_split_by_piece_and_windows_rebuild_each_piece(chorales_data):
    from attnlab.bench.tasks import chorales

    data = chorales_data
    names = data.details["pieces"]
    assert len(names) == 8 == len(set(names))
    train, test = set(data.train_source.tolist()), set(data.test_source.tolist())
    assert not train & test and train | test == set(range(8)) and len(test) == 2
    for x, y, src in (
        (data.train_inputs, data.train_targets, data.train_source),
        (data.test_inputs, data.test_targets, data.test_source),
    ):
        for piece in set(src.tolist()):
            rows = (src == piece).nonzero().flatten()
            tokens = torch.cat([x[rows].flatten()[:1], y[rows][y[rows] != -100]]).tolist()
            assert tuple(tokens) == chorales._piece(names[piece])
            assert tokens[-1] == chorales.EOS and (len(tokens) - 1) % 4 == 0
            grid = torch.tensor(tokens[:-1]).view(-1, 4)  # steps x (S, A, T, B)
            assert (grid[0] != chorales.HOLD).all()  # nothing to hold at the start
            after_rest = grid[1:][grid[:-1] == chorales.REST]
            assert (after_rest != chorales.HOLD).all()  # a hold continues a note


def test_chorale_encoding_of_a_small_score():
    pytest.importorskip("music21")
    from music21 import note, stream, tie

    from attnlab.bench.tasks import chorales

    score = stream.Score()
    voices = (["C5", "C5", None], ["G4", "A4", "B4"], ["E4", "E4", "E4"], ["C3", "C3", "C3"])
    for pitches in voices:  # a quarter then two eighths (or an eighth rest) per voice
        part = stream.Part()
        for i, name in enumerate(pitches):
            length = 0.5 if i else 1.0
            event = note.Rest() if name is None else note.Note(name)
            event.quarterLength = length
            part.append(event)
        score.insert(0, part)
    first, second = list(score.parts[0].notes)
    first.tie, second.tie = tie.Tie("start"), tie.Tie("stop")
    tokens = chorales.encode_score(score)
    p = chorales.pitch_token
    H, R = chorales.HOLD, chorales.REST
    steps = [
        [p(72), p(67), p(64), p(48)],
        [H, H, H, H],
        [H, H, H, H],
        [H, H, H, H],
        [H, p(69), p(64), p(48)],  # tied C5 continues; repeated E4 / C3 are new onsets
        [H, H, H, H],
        [R, p(71), p(64), p(48)],
        [R, H, H, H],
    ]
    assert tokens == tuple(t for step in steps for t in step) + (chorales.EOS,)
    assert p(24) == p(36) and p(96) == p(84)  # octave folding into the pitch range


def test_chorales_determinism_and_validation(chorales_data):
    again = bach_chorales(seed=0, max_len=64, test_fraction=0.25, max_pieces=8)
    assert same(again, chorales_data)
    others = [bach_chorales(seed=s, max_len=64, test_fraction=0.25, max_pieces=8) for s in (1, 2)]
    split = set(chorales_data.test_source.tolist())
    assert any(set(o.test_source.tolist()) != split for o in others)
    for kwargs, err, name in (
        ({"max_len": 30}, ValueError, "max_len"),
        ({"test_fraction": 1.0}, ValueError, "test_fraction"),
        ({"max_pieces": 1}, ValueError, "max_pieces"),
        ({"max_pieces": "4"}, TypeError, "max_pieces"),
    ):
        with pytest.raises(err, match=name):
            bach_chorales(**{"seed": 0, "max_pieces": 4, **kwargs})


def test_chorales_without_music21_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "music21", None)
    with pytest.raises(ImportError, match="pip install music21"):
        bach_chorales(seed=0, max_pieces=2)
