"""How the classifier's probabilities fail a bottle: the names a bundle, station.yaml and the what-if share.

- ``top_class``: the top class is a defect at the class confidence or more (bundles before 2026-12-08);
- ``defect_sum``: the defect classes together reach it (1 − P(good)), and the bottle is named its
  likeliest defect. station/core/decide.py applies them; docs/models.md ("The decision") measures them.
"""

from __future__ import annotations

from typing import Final, Literal

TOP_CLASS: Final = "top_class"
DEFECT_SUM: Final = "defect_sum"
DefectRule = Literal["top_class", "defect_sum"]
