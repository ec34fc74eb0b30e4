"""megascale: a large-scale language-model trainer on DeepSpeed.

The library never parses arguments and never prints; launchers in ``launch/``
do both. See README.md for the commands and DESIGN.md for the architecture.
"""

import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _bind_checkout_kernels() -> None:
    """Make the checkout's top-level ``kernels/`` importable as ``megascale.kernels``.

    setup.py installs ``kernels/`` under that name, but a checkout that is only on
    ``sys.path`` (``PYTHONPATH=$PWD`` on a GPU machine without pip access, or
    ``python -m pytest`` from a clone) has no such package, and the model would
    quietly fall back to PyTorch attention. Installed copies are left alone.
    """
    name, init = f"{__name__}.kernels", _Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if name in _sys.modules or not init.is_file() or _util.find_spec(name) is not None:
        return
    spec = _util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = _util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_bind_checkout_kernels()
