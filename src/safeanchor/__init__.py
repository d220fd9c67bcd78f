"""safeanchor: safety-preserving continual domain adaptation of chat LLMs with LoRA."""
__version__ = "0.1.0"

from .config import RunConfig, load_config  # noqa: E402,F401
from .errors import SafeAnchorError  # noqa: E402,F401


def run(config: RunConfig, out: str):
    """Run (or resume) the sequential pipeline into ``out``; returns the results dict."""
    from .pipeline import run as _run

    return _run(config, out)
