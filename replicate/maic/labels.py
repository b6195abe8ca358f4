"""MAIC's labels: the (diagnosis, sex, age band) sub-classes derived from the training persons, label
masking by a person's group, the token votes that diagnose a person, and the person-level scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from replicate import metrics
from replicate.maic.data import DIAGNOSES, SEXES, Person

BANDS: tuple[str, ...] = ("55+", "<55")  # the source's L1-L6 are the men aged 55 or over: that group first
DIAGNOSIS_INDICES = list(range(len(DIAGNOSES)))  # sklearn's `labels`: every diagnosis is scored, present or not


def age_band(age: float, threshold: float = 55.0) -> str:
    """ "55+" for `threshold` years or more, else "<55" (the source's two bands)."""
    return BANDS[0] if age >= threshold else BANDS[1]


@dataclass(frozen=True)
class SubclassTable:
    """The (diagnosis, sex, age band) combinations found in the training data, one sub-class each.

    Ordered by group (men 55+, men <55, women 55+, women <55) and within a group by the diagnosis order,
    so a group's sub-classes are consecutive (the source's L1-L6 are the men aged 55 or over).

    Attributes:
        entries: (diagnosis, sex, band) per sub-class.
        age_threshold: the age that separates the bands.
    """

    entries: tuple[tuple[str, str, str], ...]
    age_threshold: float = 55.0

    @classmethod
    def from_persons(cls, persons: Sequence[Person], age_threshold: float = 55.0, subdivide: bool = True):
        """Derive the table from labelled persons; `subdivide=False` gives one class per diagnosis."""
        if not subdivide:
            found = {person.diagnosis for person in persons}
            return cls(tuple((d, "*", "*") for d in DIAGNOSES if d in found), age_threshold)
        found = {(person.diagnosis, person.sex, age_band(person.age, age_threshold)) for person in persons}
        order = [(d, s, b) for s in SEXES for b in BANDS for d in DIAGNOSES]
        return cls(tuple(entry for entry in order if entry in found), age_threshold)

    @property
    def labels(self) -> list[str]:
        return [f"L{i}" for i in range(1, len(self.entries) + 1)]

    @property
    def diagnosis_index(self) -> np.ndarray:
        """Per sub-class, the index of its diagnosis in DIAGNOSES."""
        return np.array([DIAGNOSES.index(diagnosis) for diagnosis, _, _ in self.entries])

    def subclass_of(self, person: Person) -> int:
        """The person's sub-class; a combination the table lacks is an error."""
        wanted = (person.diagnosis, person.sex, age_band(person.age, self.age_threshold))
        for index, (diagnosis, sex, band) in enumerate(self.entries):
            if diagnosis == wanted[0] and sex in (wanted[1], "*") and band in (wanted[2], "*"):
                return index
        raise ValueError(f"person {person.person_id}: {wanted} is not a sub-class of the training data")

    def mask(self, sex: str, age: float) -> np.ndarray:
        """Which sub-classes a person of this sex and age can belong to; all of them if the training data
        have no sub-class of the person's group (then nothing is masked)."""
        band = age_band(age, self.age_threshold)
        allowed = np.array([s in (sex, "*") and b in (band, "*") for _, s, b in self.entries])
        return allowed if allowed.any() else np.ones(len(self.entries), dtype=bool)

    def masks(self, persons: Sequence[Person]) -> np.ndarray:
        """(persons, sub-classes): each person's `mask`."""
        return np.stack([self.mask(person.sex, person.age) for person in persons])

    def to_config(self) -> dict:
        return {"entries": [list(entry) for entry in self.entries], "age_threshold": self.age_threshold}

    @classmethod
    def from_config(cls, config: dict) -> SubclassTable:
        return cls(tuple(tuple(entry) for entry in config["entries"]), float(config["age_threshold"]))


def diagnosis_probabilities(probabilities: np.ndarray, table: SubclassTable, masks: np.ndarray | None) -> np.ndarray:
    """Sub-class probabilities (tokens, sub-classes) → diagnosis probabilities (tokens, 6), after zeroing
    the masked sub-classes (`masks`: (tokens, sub-classes) booleans, or None) and renormalising — the same
    as a softmax over logits with the masked ones set to −∞."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if masks is not None:
        probabilities = np.where(masks, probabilities, 0.0)
        totals = probabilities.sum(axis=1, keepdims=True)
        probabilities = probabilities / np.where(totals > 0, totals, 1.0)
    out = np.zeros((len(probabilities), len(DIAGNOSES)))
    np.add.at(out.T, table.diagnosis_index, probabilities.T)
    return out


def vote(token_diagnosis_probabilities: np.ndarray, tie_rule: str = "probability") -> tuple[int, np.ndarray]:
    """A person's diagnosis from its tokens: each token votes for its most probable diagnosis (the
    diagnosis of its argmax sub-class after masking); the most votes win.

    Tie rule "probability": among the tied diagnoses, the one with the highest probability summed over the
    person's tokens (then the first in DIAGNOSES order); "first": the first tied one in DIAGNOSES order.

    Returns:
        (diagnosis index, votes per diagnosis).
    """
    if tie_rule not in ("probability", "first"):
        raise ValueError(f"tie_rule must be 'probability' or 'first', got {tie_rule!r}")
    probabilities = np.asarray(token_diagnosis_probabilities)
    votes = np.bincount(probabilities.argmax(axis=1), minlength=len(DIAGNOSES))
    tied = np.flatnonzero(votes == votes.max())
    if len(tied) == 1 or tie_rule == "first":
        return int(tied[0]), votes
    summed = probabilities[:, tied].sum(axis=0)
    return int(tied[np.argmax(summed)]), votes


def person_predictions(
    token_probabilities: np.ndarray,
    token_person: np.ndarray,
    persons: Sequence[Person],
    table: SubclassTable,
    *,
    masking: bool = True,
    tie_rule: str = "probability",
) -> tuple[np.ndarray, np.ndarray]:
    """Per person, the voted diagnosis index (−1 for a person without tokens) and the mean diagnosis
    probabilities of its tokens: (persons,) and (persons, 6). `token_probabilities` are the (tokens,
    sub-classes) model outputs, `token_person` each token's index in `persons`; `masking` masks the
    sub-classes outside each person's sex/age group (the source's label masking); `tie_rule`: see `vote`."""
    masks = table.masks(persons)[token_person] if masking else None
    diagnosis = diagnosis_probabilities(token_probabilities, table, masks)
    predicted = np.full(len(persons), -1)
    probabilities = np.zeros((len(persons), len(DIAGNOSES)))
    for index in range(len(persons)):
        rows = np.flatnonzero(token_person == index)
        if len(rows):
            predicted[index], _ = vote(diagnosis[rows], tie_rule)
            probabilities[index] = diagnosis[rows].mean(axis=0)
    return predicted, probabilities


def score_persons(
    member_probabilities: np.ndarray,
    token_person: np.ndarray,
    persons: Sequence[Person],
    targets: np.ndarray,
    table: SubclassTable,
    inference: dict,
    majority: int,
) -> dict:
    """Person-level scores (the competition's macro F1) of each member and the first-k ensembles, with and
    without label masking, plus per-class F1, the confusion matrix and token-level numbers.
    `member_probabilities` are the members' (members, tokens, sub-classes) outputs for the voting tokens,
    `token_person` each token's index in `persons`, `targets` the persons' diagnosis indices, `inference`
    the recipe's table (label_masking, tie_rule), `majority` the training persons' most frequent diagnosis."""
    from replicate.ensemble import score_members

    def diagnoses(probabilities: np.ndarray, masking: bool) -> np.ndarray:
        return person_predictions(
            probabilities, token_person, persons, table, masking=masking, tie_rule=inference["tie_rule"]
        )[0]

    def person_f1(masking: bool) -> dict:
        def metric(_, probabilities):
            return metrics.macro_f1(targets, diagnoses(probabilities, masking), labels=DIAGNOSIS_INDICES)

        return score_members(member_probabilities, targets, metric, name="macro_f1")

    masked, unmasked = person_f1(True), person_f1(False)
    ensemble = member_probabilities.mean(axis=0)
    return {
        "persons": len(persons),
        "tokens": len(token_person),
        "label_masking": inference["label_masking"],
        **(masked if inference["label_masking"] else unmasked),
        **{f"{key}_masked": value for key, value in masked.items()},
        **{f"{key}_unmasked": value for key, value in unmasked.items()},
        "majority_macro_f1": metrics.macro_f1(targets, np.full(len(targets), majority), labels=DIAGNOSIS_INDICES),
        "majority_class": DIAGNOSES[majority],
        **_ensemble_person_scores(targets, diagnoses(ensemble, inference["label_masking"])),
        "token": _token_scores(ensemble, targets[token_person], table.masks(persons)[token_person], table),
    }


def _ensemble_person_scores(targets: np.ndarray, predicted: np.ndarray) -> dict:
    """Per-diagnosis F1, accuracy and the confusion matrix of the ensemble's person diagnoses."""
    from sklearn import metrics as sk_metrics

    f1 = sk_metrics.f1_score(targets, predicted, labels=DIAGNOSIS_INDICES, average=None, zero_division=0)
    return {
        "per_class_f1": dict(zip(DIAGNOSES, f1.tolist(), strict=True)),
        "accuracy": float(np.mean(predicted == targets)),
        "confusion_matrix": sk_metrics.confusion_matrix(targets, predicted, labels=DIAGNOSIS_INDICES).tolist(),
    }


def _token_scores(probabilities: np.ndarray, targets: np.ndarray, masks: np.ndarray, table: SubclassTable) -> dict:
    """Accuracy and macro F1 of the tokens' own diagnoses (argmax after mapping sub-classes to diagnoses),
    with and without masking."""
    scores = {}
    for name, token_masks in (("masked", masks), ("unmasked", None)):
        predicted = diagnosis_probabilities(probabilities, table, token_masks).argmax(axis=1)
        scores[name] = {
            "accuracy": float(np.mean(predicted == targets)),
            "macro_f1": metrics.macro_f1(targets, predicted, labels=DIAGNOSIS_INDICES),
        }
    return scores
