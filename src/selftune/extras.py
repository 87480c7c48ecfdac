"""Optional parts of selftune, installed as extras: a clear line when one is missing."""

from __future__ import annotations

from selftune.errors import SelftuneError

DEFAULT_MODEL_EXTRA = "pip install 'selftune[default-model]'"
PLOTS_EXTRA = "pip install 'selftune[plots]'"


def require_matplotlib(command: str) -> None:
    """``command`` draws figures: refuse to start without matplotlib (the ``plots`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SelftuneError(f"{command} draws its figures with matplotlib, which is not "
                            f"installed: {PLOTS_EXTRA}") from None
