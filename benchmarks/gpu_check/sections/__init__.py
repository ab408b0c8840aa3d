"""The sections of the report, in the order they run and share the time budget.

A section is one module of this folder that ends in ``SECTION = Section(...)`` (``..core``): a
name for ``--sections``, the report's heading, its share of the budget, the function that writes
its text, tables, checks and targets to a ``Sink`` (``..report``), and its sizes for the full and
the smoke run. Listed below, it runs, is reported and is accepted by ``--sections``.
"""

from __future__ import annotations

from ..core import Section
from . import adv, correctness, kd, kernel, ssl

SECTIONS: dict[str, Section] = {
    s.name: s for s in (correctness.SECTION, kernel.SECTION, kd.SECTION, adv.SECTION, ssl.SECTION)
}
