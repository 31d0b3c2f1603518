"""The atomic steps of the job store (and the reconciler's leadership), as Lua programs: one
file per step, each with a header naming its KEYS and ARGV. Every program is preceded by the
key names of ``common.redis_keys`` (as Lua) and by ``lib.lua``, the helpers they share."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from common.redis_keys import LUA_NAMES

# Stands in for an argument while a Python helper is called to learn its name's shape.
_HOLE = "\x00"


def _lua_string(text: str) -> str:
    if "'" in text or "\\" in text or _HOLE in text:
        raise ValueError(f"key name text not expressible as a plain Lua string: {text!r}")
    return f"'{text}'"


@cache
def key_names() -> str:
    """``LUA_NAMES`` as Lua: a ``local`` per constant, a ``local function`` per name built
    from arguments (each helper is called with placeholders and the parts joined with ``..``)."""
    lines = ["-- Key names, generated from common/redis_keys.py (LUA_NAMES)."]
    for name, spec in LUA_NAMES.items():
        if isinstance(spec, str):
            lines.append(f"local {name} = {_lua_string(spec)}")
            continue
        build, params = spec
        text = build(*(f"{_HOLE}{i}{_HOLE}" for i in range(len(params))))
        parts: list[str] = []
        for index, piece in enumerate(text.split(_HOLE)):
            if index % 2:
                parts.append(params[int(piece)])
            elif piece:
                parts.append(_lua_string(piece))
        lines.append(f"local function {name}({', '.join(params)}) return {' .. '.join(parts)} end")
    return "\n".join(lines) + "\n"


@cache
def source(name: str) -> str:
    """The program ``<name>.lua``, preceded by the key names and the shared helpers."""
    here = files(__package__)
    lib = here.joinpath("lib.lua").read_text()
    return key_names() + lib + "\n" + here.joinpath(f"{name}.lua").read_text()
