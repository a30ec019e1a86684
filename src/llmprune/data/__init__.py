"""Calibration and evaluation text: WikiText-2, C4 and local files, resolved without a hub when possible."""

from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import Corpus, load_corpus
from llmprune.data.tokens import eval_token_stream

__all__ = ["Corpus", "calibration_windows", "eval_token_stream", "load_corpus"]
