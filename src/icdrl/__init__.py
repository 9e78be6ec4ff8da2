"""icdrl: which in-context demonstrations to show a vision-language model.

See docs/ARCHITECTURE.md for the module contract, docs/science.md for the science and
docs/defects.md for the reference implementation's defects it guards against.
"""

__version__ = "0.1.0"
