"""``to_dict`` / ``from_dict`` for the networks' configuration dataclasses.

A model file stores its network's configuration as a plain dict (``torch.load(weights_only=True)``
reads only plain data), so every config converts to one and back the same way.
"""

from __future__ import annotations

from dataclasses import asdict, fields

__all__ = ["DictConfig"]


class DictConfig:
    """Mixin for a dataclass: tuples become lists in :meth:`to_dict`; unknown keys are refused."""

    def to_dict(self) -> dict:
        """Plain JSON-compatible dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict):
        """Inverse of :meth:`to_dict`; unknown keys raise a :class:`ValueError`."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
        return cls(**data)
