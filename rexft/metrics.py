"""Text and accuracy metrics with their 95% intervals.

    ROUGE-L      F-measure of the longest common subsequence, from the ``rouge-score`` package with Porter
                 stemming (what SNI's official evaluation script computes), max over an example's references
    exact match  1 if prediction and a reference agree after lower-casing and removing punctuation, the
                 articles a / an / the and extra white space (SQuAD's normalisation), max over references
    intervals    accuracy: Wilson; ROUGE-L / EM: percentile bootstrap over examples (stratified by task for
                 macro averages, so every resample keeps each task's size)
"""

from __future__ import annotations

import math
import re
import string
from functools import lru_cache

import numpy as np

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(r) for r in references))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    scorer = _rouge_scorer()
    return max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)


def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 0.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def bootstrap_ci(groups: list[list[float]], resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean over groups of the per-group mean (one group: a plain mean),
    resampling examples within each group."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups or resamples <= 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for values in groups:
        draws = rng.integers(0, len(values), size=(resamples, len(values)))
        means += values[draws].mean(1)
    means /= len(groups)
    low, high = np.percentile(means, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]
