"""icdrl: which in-context demonstrations to show a vision-language model.

See docs/ARCHITECTURE.md for the module contract and ../shared/SPEC.md for the science.
"""

__version__ = "0.1.0"
