"""llmprune: prune large language models layer by layer, and measure what it did."""

__version__ = "0.1.0"

from llmprune import masks  # noqa: E402
from llmprune.config import PruneConfig  # noqa: E402
from llmprune.errors import LLMPruneError  # noqa: E402
from llmprune.models.loading import load_model  # noqa: E402
from llmprune.pipeline import PruneResult, evaluate, prune  # noqa: E402

__all__ = ["LLMPruneError", "PruneConfig", "PruneResult", "__version__", "evaluate", "load_model", "masks", "prune"]
