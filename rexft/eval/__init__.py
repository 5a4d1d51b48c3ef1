"""The eval stage, in three parts: ``protocols`` (what is scored, as typed records, on an engine of
``rexft.inference``), ``report`` (summaries, tables, routing heatmap, ``rexft eval compare``), and
``stage`` (``rexft eval`` itself).

What other stages may use (merge-export's fidelity table scores its static exports as eval does, and
reuses eval's predictions of the dynamic adapter) is named here; the modules' other names are eval's own.
"""

from rexft.eval.protocols import Prediction, Prompts, score_examples
from rexft.eval.report import headline, summarize
from rexft.eval.stage import reusable_predictions

__all__ = ["Prediction", "Prompts", "headline", "reusable_predictions", "score_examples", "summarize"]
