"""The base of every config table both parties parse: strict types, unknown keys rejected.

``StrictModel``: pydantic in strict mode, so ``LoRAConfig(r="8")`` is an error naming ``r``
rather than a silent cast (TOML has typed values: a string where a number belongs is a mistake
in the file). What strict mode still converts: an int where a float belongs (``lr = 1`` is 1.0).
``FilePath``: a path field, the one lax field type, since TOML has no path type and paths are
written as strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FilePath", "StrictModel"]

#: A filesystem path given as a string in TOML (the only field type converted from a string).
FilePath = Annotated[Path, Field(strict=False)]


class StrictModel(BaseModel):
    """Base for config tables: unknown keys rejected, values of the declared type only (strict
    mode, checked on assignment too).

    Raises:
        pydantic.ValidationError: an unknown key, or a value of another type (e.g. ``"8"`` for
            an int); the error names the field.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)
