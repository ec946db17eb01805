"""ravlt_pl: RAVLT (Rank-Augmented Vision Linear Transformer, CVPR 2025) with PyTorch Lightning.

Importing the package registers ``ravlt_t/s/b/l`` with timm.
"""

from . import models  # noqa: F401  (timm registration)

__version__ = "0.1.0"
