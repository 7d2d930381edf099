"""The report of ``attnlab bench``: aggregation of the stored records, a terminal summary,
crossover lengths, and a self-contained ``report.html``.

Input: the records of a results folder (:func:`load_records`, the last record per key of
``results.jsonl``, see :mod:`attnlab.bench.store`); :mod:`.records` describes the two suites
understood (efficiency and quality) and how other records are counted.

attnlab is compared with two baselines: ``sdpa_dense`` (torch SDPA with the pattern as a
dense mask: the same function) and ``sdpa_fast`` (torch SDPA without the pattern: what
ignoring the sparsity costs, not the same function). Times compared with a baseline are
fwd+bwd where both sides have it, else forward: the *time ratio* ``t/dense`` (``t/flash``)
is attnlab's time divided by ``sdpa_dense``'s (``sdpa_fast``'s) at the same length (below 1:
attnlab is faster). See :func:`crossovers` for the crossover length (``baseline=``).

The public functions take the list of record dicts; nothing here needs matplotlib, which
:mod:`attnlab.bench.plots` imports lazily for the PNGs of :func:`write_report`.

Modules: :mod:`.records` (loading, parsing, grouping), :mod:`.formatting` (numbers, header
text), :mod:`.crossover`, :mod:`.quality_table` (aggregation over seeds), :mod:`.summary`
(attnlab at the largest length vs the baselines), :mod:`.text` (terminal summary),
:mod:`.findings`, :mod:`.html_cells`, :mod:`.html_tables` and :mod:`.html_page` (report.html).
"""

from .crossover import Crossover, crossover_details, crossovers
from .formatting import fmt_err, fmt_ratio, fmt_sig
from .html_page import REPORT_FILE, write_report
from .quality_table import QualityRow, aggregate_quality
from .records import (
    ATTNLAB,
    BASELINES,
    DENSE,
    EFFICIENCY,
    FAST,
    HIGH_SPREAD,
    PATTERNS,
    QUALITY,
    SeriesKey,
    load_records,
)
from .text import summary_table

__all__ = [
    "ATTNLAB",
    "BASELINES",
    "DENSE",
    "EFFICIENCY",
    "FAST",
    "HIGH_SPREAD",
    "PATTERNS",
    "QUALITY",
    "REPORT_FILE",
    "Crossover",
    "QualityRow",
    "SeriesKey",
    "aggregate_quality",
    "crossover_details",
    "crossovers",
    "fmt_err",
    "fmt_ratio",
    "fmt_sig",
    "load_records",
    "summary_table",
    "write_report",
]
