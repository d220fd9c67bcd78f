"""Methods register themselves on import; ``load_all`` imports every module in this package."""
import importlib
import pkgutil

from .base import METHODS, Method, MethodConfig, get_method, register  # noqa: F401


def load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
