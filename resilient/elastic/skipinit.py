"""Skip the random initialisation of modules whose values a restore is about to overwrite.

Rebuilding a model after a failure runs its initialisers again (kaiming, uniform, normal...) for values
the snapshot replaces a moment later: ~0.15 s per 50M parameters on one core, seconds for a large model.
``skip_init()`` turns the functions of ``torch.nn.init`` into no-ops while modules are built, the way
Hugging Face's ``no_init_weights`` does, so their parameters are left as allocated::

    with ctx.skip_init():          # a no-op on a fresh start
        model = Net()
    ctx.protect(model=model, ...)  # every key of the model is restored from the snapshot

Only modules whose every parameter and buffer the restore fills may be built inside (``protect``
refuses a snapshot that lacks any key of a protected module, so a protected module is never left half
initialised). Initialisation written as tensor methods (``w.data.normal_()``) is not skipped.
The RNG states come back from the snapshot too, so skipping the draws changes nothing after the restore.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")
_lock = threading.Lock()  # the patch is process-wide: one scope at a time


def _no_init(tensor: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def skip_init(enabled: bool = True) -> Iterator[None]:
    """Within the block, ``torch.nn.init`` initialisers leave their tensor untouched (when ``enabled``)."""
    if not enabled:
        yield
        return
    init = torch.nn.init
    with _lock:
        saved = {name: getattr(init, name) for name in INIT_FUNCTIONS if hasattr(init, name)}
        try:
            for name in saved:
                setattr(init, name, _no_init)
            yield
        finally:
            for name, fn in saved.items():
                setattr(init, name, fn)
