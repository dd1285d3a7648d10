"""Per-model backend override shared by the top-level models."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

from .. import ops


class BackendSelectable:
    """Mixin: ``model.set_backend("triton")`` makes every op inside ``model.forward`` use it.

    ``None`` (the default) leaves the selection to the surrounding context / process default.
    """

    backend: Optional[str] = None

    def set_backend(self, name: Optional[str]):
        if name is not None and name != ops.AUTO:
            ops._dispatch.get_backend_object(name)  # unknown names raise here, not mid-forward
        self.backend = name
        return self

    def backend_context(self) -> ContextManager:
        return ops.use_backend(self.backend) if self.backend is not None else contextlib.nullcontext()
