"""The atomic steps of the job store (and the reconciler's leadership), as Lua programs: one
file per step, each with a header naming its KEYS and ARGV. ``lib.lua`` holds the helpers they
share and is prepended."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def source(name: str) -> str:
    """The program ``<name>.lua``, preceded by the shared helpers."""
    here = files(__package__)
    return here.joinpath("lib.lua").read_text() + "\n" + here.joinpath(f"{name}.lua").read_text()
