"""Next-event prediction on J.S. Bach's four-part chorales (music21's bundled corpus).

The raster-scan serialisation of the four voices on a sixteenth-note grid follows Huang et
al., "Music Transformer: Generating Music with Long-Term Structure" (2018), section 4.1,
where the same data compare relative and absolute position information.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np
import torch

from attnlab._checks import check_int

from .base import IGNORE_INDEX, TaskData, check_fraction, split_indices

PAD, EOS, REST, HOLD = 0, 1, 2, 3
"""Special tokens: padding (inputs only), end of piece, rest, continuation of a held note."""
LOWEST_PITCH, HIGHEST_PITCH = 36, 84
"""MIDI range C2..C6 of the pitch tokens (the corpus spans 36..81); others fold by octaves."""
PITCH_OFFSET = 4
VOCAB_SIZE = PITCH_OFFSET + HIGHEST_PITCH - LOWEST_PITCH + 1  # 53
STEPS_PER_QUARTER = 4  # sixteenth-note grid
VOICES = ("soprano", "alto", "tenor", "bass")


def _music21() -> ModuleType:
    try:
        import music21.corpus
    except ImportError as exc:
        raise ImportError(
            "the Bach chorales task needs music21 (its corpus ships with it, no download): "
            "pip install music21"
        ) from exc
    return music21


def pitch_token(midi: int) -> int:
    """Token of MIDI pitch ``midi``, folded by octaves into ``[LOWEST_PITCH, HIGHEST_PITCH]``."""
    while midi < LOWEST_PITCH:
        midi += 12
    while midi > HIGHEST_PITCH:
        midi -= 12
    return PITCH_OFFSET + midi - LOWEST_PITCH


def _satb_parts(score: Any) -> list[Any] | None:
    """The soprano, alto, tenor and bass parts: all parts of a four-part score, else the
    parts named exactly by a voice's first word (one each); None if that is ambiguous."""
    parts = list(score.parts)
    if len(parts) == 4:
        return parts
    found: dict[str, list[Any]] = {v: [] for v in VOICES}
    for part in parts:
        words = (part.partName or "").lower().split()
        if words and words[0] in found:
            found[words[0]].append(part)
    if all(len(found[v]) == 1 for v in VOICES):
        return [found[v][0] for v in VOICES]
    return None


def encode_score(score: Any) -> tuple[int, ...] | None:
    """Tokens of a ``music21.stream.Score`` (see :func:`bach_chorales`); None if not SATB."""
    parts = _satb_parts(score)
    if parts is None:
        return None
    voices: list[list[tuple[int, int, int]]] = []
    for part in parts:
        notes = []
        for n in part.flatten().notes:
            length = float(n.duration.quarterLength)
            if length <= 0:  # grace notes
                continue
            start = round(float(n.offset) * STEPS_PER_QUARTER)
            end = max(start + 1, round((float(n.offset) + length) * STEPS_PER_QUARTER))
            if n.tie is not None and n.tie.type in ("stop", "continue"):
                token = HOLD  # continues the note it is tied to
            else:
                token = pitch_token(max(p.midi for p in n.pitches))
            notes.append((start, end, token))
        voices.append(sorted(notes))
    steps = max((end for notes in voices for _, end, _ in notes), default=0)
    if steps == 0:
        return None
    grid = np.full((steps, len(VOICES)), REST, dtype=np.int64)
    for v, notes in enumerate(voices):
        for start, end, token in notes:
            grid[start, v] = token
            grid[start + 1 : end, v] = HOLD
    return tuple(grid.reshape(-1).tolist()) + (EOS,)


@functools.lru_cache(maxsize=None)
def _piece(name: str) -> tuple[int, ...] | None:
    """Encoded piece ``name`` of the corpus (parsed once per process)."""
    return encode_score(_music21().corpus.parse(name))


def load_pieces(max_pieces: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, tokens)`` of the distinct SATB chorales of ``music21.corpus.chorales.Iterator``
    (Riemenschneider order, duplicate names and identical encodings dropped), the first
    ``max_pieces`` of them when given."""
    m21 = _music21()
    names = dict.fromkeys(m21.corpus.chorales.Iterator(returnType="filename"))
    pieces: list[tuple[str, tuple[int, ...]]] = []
    seen: set[tuple[int, ...]] = set()
    for name in names:
        if max_pieces is not None and len(pieces) >= max_pieces:
            break
        tokens = _piece(name)
        if tokens is not None and tokens not in seen:
            seen.add(tokens)
            pieces.append((name, tokens))
    return pieces


def _windows(tokens: tuple[int, ...], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows: inputs ``t[k*L : k*L+L]``, targets ``t[k*L+1 : k*L+L+1]``."""
    t = np.asarray(tokens, dtype=np.int64)
    count = -(-(len(t) - 1) // max_len)
    x = np.full((count, max_len), PAD, dtype=np.int64)
    y = np.full((count, max_len), IGNORE_INDEX, dtype=np.int64)
    for k in range(count):
        chunk = t[k * max_len : k * max_len + max_len + 1]
        x[k, : len(chunk) - 1] = chunk[:-1]
        y[k, : len(chunk) - 1] = chunk[1:]
    return x, y


def bach_chorales(
    *,
    seed: int,
    max_len: int = 512,
    test_fraction: float = 0.2,
    max_pieces: int | None = None,
) -> TaskData:
    """Bach chorales as next-event sequences (Music Transformer, Huang et al., 2018).

    Encoding. Each voice is put on a sixteenth-note grid (onsets and ends rounded to the
    grid, a tied note continues the note it is tied to, grace notes dropped). At every step
    the four voices are read in the order soprano, alto, tenor, bass (raster scan, as in
    Music Transformer), each giving one token: its pitch if a note starts there, ``HOLD``
    (3) if a note continues, ``REST`` (2) otherwise. Pitch tokens are ``4 + midi - 36`` for
    MIDI 36..84; ``EOS`` (1) ends a piece and ``PAD`` (0) pads inputs, so
    ``vocab_size = 53``. Position ``p`` of a piece is voice ``p % 4`` of step ``p // 4``.
    (Music Transformer repeats the pitch of a held note; ``HOLD`` keeps repeated notes and
    held notes apart.)

    Examples. A piece of ``T`` tokens gives ``ceil((T - 1) / max_len)`` windows starting at
    multiples of ``max_len`` (a multiple of 4, so every window starts with a soprano token):
    the inputs are ``max_len`` tokens and the targets the next token at every position,
    ``-100`` past the end of the piece. Pieces are split by :func:`split_indices` (seeded,
    ``test_fraction`` of the pieces in test), so no piece has windows in both;
    ``*_source`` hold each window's piece index into ``details["pieces"]``.

    Loading all 348 usable chorales parses MusicXML for tens of seconds on a laptop (music21
    keeps a pickle cache); ``max_pieces`` keeps the first pieces only, for quick runs.
    """
    check_int("seed", seed, 0)
    check_int("max_len", max_len, 4)
    if max_len % 4:
        raise ValueError(f"max_len must be a multiple of 4 (one step), got max_len={max_len}")
    frac = check_fraction("test_fraction", test_fraction)
    if max_pieces is not None:
        check_int("max_pieces", max_pieces, 2)
    pieces = load_pieces(max_pieces)
    if len(pieces) < 2:
        raise ValueError(f"need at least 2 chorales to split, found {len(pieces)}")
    train_idx, test_idx = split_indices(len(pieces), frac, seed)

    def gather(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, src = [], [], []
        for i in indices.tolist():
            x, y = _windows(pieces[i][1], max_len)
            xs.append(x)
            ys.append(y)
            src.append(np.full(len(x), i, dtype=np.int64))
        cat = np.concatenate
        return torch.from_numpy(cat(xs)), torch.from_numpy(cat(ys)), torch.from_numpy(cat(src))

    train_x, train_y, train_src = gather(train_idx)
    test_x, test_y, test_src = gather(test_idx)
    return TaskData(
        name="bach_chorales",
        train_inputs=train_x,
        train_targets=train_y,
        test_inputs=test_x,
        test_targets=test_y,
        vocab_size=VOCAB_SIZE,
        num_classes=None,
        train_source=train_src,
        test_source=test_src,
        details={
            "num_pieces": len(pieces),
            "test_pieces": len(test_idx),
            "grid": "sixteenth",
            "voices": "SATB raster",
            "seed": seed,
            "pieces": tuple(name for name, _ in pieces),
        },
    )
