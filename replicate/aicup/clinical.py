"""The clinical branch's 44 inputs, encoded from the 26 clinical columns with the competition's code book."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from replicate.aicup.data import FIELD_NAMES, FIELDS

ONE_HOT = (
    "Smoking",
    "frequency",
    "Onset of dysphonia",
    "Noise at work",
    "Diurnal pattern",
    "Occupational vocal demand",
)


@dataclass(frozen=True)
class ClinicalEncoder:
    """The source's 44 clinical inputs: 20 numeric fields, then one-hot codes of 6 categorical fields.

    Numeric fields in the table's order: Sex − 1, Age / 50, the 9 symptom flags, PPD, Drinking, the 6
    comorbidity flags, VHI-10 / 40; empty PPD and VHI-10 cells are 0 (as the organisers' preprocessing
    did). Then one column per code of Smoking (0-3), frequency (0-3), Onset of dysphonia (1-5), Noise at
    work (1-3), Diurnal pattern (1-4) and Occupational vocal demand (1-4), in that order — the order the
    source's `pd.get_dummies` produced. The codes come from the competition's code book, not from the
    data, so every split gets the same 44 columns (`get_dummies` on a test list lacking a code would have
    shifted the columns).

    Attributes:
        numeric: (column, offset, scale) per numeric input: (value − offset) / scale.
        categories: (column, codes) per one-hot field.
        fitted_on: rows and empty-cell counts of the training table it was fitted on.
    """

    numeric: tuple[tuple[str, float, float], ...]
    categories: tuple[tuple[str, tuple[int, ...]], ...]
    fitted_on: dict = field(default_factory=dict, compare=False)

    @classmethod
    def fit(cls, table: pd.DataFrame) -> ClinicalEncoder:
        """The encoder for a checked training table (`data.read_table`); it records what it was fitted on."""
        missing = [name for name in FIELD_NAMES if name not in table.columns]
        if missing:
            raise ValueError(f"the table lacks clinical columns {missing}")
        scales = {"Sex": (1.0, 1.0), "Age": (0.0, 50.0), "Voice handicap index - 10": (0.0, 40.0)}
        numeric = tuple((name, *scales.get(name, (0.0, 1.0))) for name in FIELD_NAMES if name not in ONE_HOT)
        by_name = {f.name: f for f in FIELDS}
        categories = tuple(
            (name, tuple(range(int(by_name[name].low), int(by_name[name].high) + 1))) for name in ONE_HOT
        )
        fitted_on = {
            "rows": len(table),
            "empty_cells": {n: int(table[n].isna().sum()) for n in ("PPD", "Voice handicap index - 10")},
        }
        return cls(numeric, categories, fitted_on)

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(codes) for _, codes in self.categories)

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        """(rows, 44) float32 inputs of a checked table (training or test list)."""
        columns = [
            (table[name].fillna(0.0).to_numpy(np.float64) - offset) / scale for name, offset, scale in self.numeric
        ]
        for name, codes in self.categories:
            values = table[name].to_numpy()
            unknown = sorted(set(values.tolist()) - set(codes))
            if unknown:
                raise ValueError(f"{name!r} has codes {unknown} outside the encoder's {list(codes)}")
            columns += [(values == code).astype(np.float64) for code in codes]
        return np.stack(columns, axis=1).astype(np.float32)

    def to_config(self) -> dict:
        return {
            "numeric": [list(entry) for entry in self.numeric],
            "categories": [[name, list(codes)] for name, codes in self.categories],
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_config(cls, config: Mapping) -> ClinicalEncoder:
        return cls(
            tuple((name, float(offset), float(scale)) for name, offset, scale in config["numeric"]),
            tuple((name, tuple(int(code) for code in codes)) for name, codes in config["categories"]),
            dict(config.get("fitted_on", {})),
        )
