"""megascale: a large-scale language-model trainer on DeepSpeed.

The library never parses arguments and never prints; launchers in ``launch/``
do both. See README.md for the commands and DESIGN.md for the architecture.
"""

__version__ = "0.1.0"
