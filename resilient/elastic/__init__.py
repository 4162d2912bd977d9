"""The train-function API: ``@resilient.elastic``, ``Context``, state capture and exact resume.

``decorator`` (the recovery loop), ``context`` (what the train function sees), ``capture`` (protected
objects <-> named tensors + meta), ``snapshots`` (segment write/read), ``rng`` (generator states),
``distributed`` (process-group lifetime), ``exactness`` (``state_hash``), ``skipinit`` (``ctx.skip_init()``:
no random initialisation of modules a restore overwrites).

This package is itself callable and is the decorator: ``resilient.elastic`` names both the package and
the decorator (Python binds a subpackage as an attribute of its parent on import), so calling the
package calls ``decorator.elastic``.
"""

import sys
import types

from resilient.elastic.context import Context
from resilient.elastic.decorator import ElasticConfig, elastic
from resilient.elastic.exactness import state_hash

__all__ = ["Context", "ElasticConfig", "elastic", "state_hash"]


class _DecoratorModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return elastic(*args, **kwargs)


sys.modules[__name__].__class__ = _DecoratorModule
