"""Model patching: one generic decoder patcher (patcher.py) and per-family descriptions
(families.py)."""
from fastft.models.families import FAMILIES, Family, family_for
from fastft.models.patcher import is_patched, patch_model, patched_names, unpatch_all

__all__ = ["FAMILIES", "Family", "family_for", "is_patched", "patch_model", "patched_names",
           "unpatch_all"]
