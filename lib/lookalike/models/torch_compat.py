"""Make the PyPI torchvision 0.28.0 importable next to the CPU-only torch wheel.

That torchvision wheel is CUDA-built: its C extension (``torchvision/_C.so``) does not load
next to CPU torch, and ``import torchvision`` then dies in ``_meta_registrations`` with
"operator torchvision::nms does not exist", because it registers fake kernels for ``nms``
and ``qnms`` without checking whether the extension loaded. Defining those two op schemas
first lets the import finish; every other torchvision op checks for the extension itself.
open_clip and timm import torchvision, so call :func:`ensure_torchvision` before them.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

_lock = threading.Lock()
# The Library object must stay referenced: its definitions are removed when it is collected.
_schema_lib: object | None = None
_done = False

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor",
)


def ensure_torchvision() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas when torchvision's own extension cannot load.

    Idempotent and cheap after the first call. When the extension does load (a torchvision
    build that matches torch), nothing is defined, so the real operators stay in charge.
    """
    global _schema_lib, _done
    with _lock:
        if _done or "torchvision" in sys.modules:
            _done = True
            return
        import torch

        # Skip when the ops exist already (the extension loaded, or someone defined them).
        if not hasattr(torch.ops.torchvision, "nms") and not _extension_loads(torch):
            lib = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                lib.define(schema)
            _schema_lib = lib
        _done = True


def _extension_loads(torch_module: ModuleType) -> bool:
    """Try to load torchvision's C extension exactly as torchvision would (without importing it)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision installed: nothing to patch
    candidates = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C.*"))
    if not candidates:
        return False
    try:
        torch_module.ops.load_library(str(candidates[0]))
    except OSError:
        return False
    return True
