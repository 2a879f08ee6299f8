"""musicssl: multi-view self-supervised learning on music audio, with collapse metrics.

Nothing in this package knows about Ray or Optuna; the search lives in ``hpsearch``.
"""

__version__ = "0.1.0"
