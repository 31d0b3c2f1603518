"""The Lua steps and the Python name Redis keys alike: one table, checked in a real Valkey."""

from __future__ import annotations

import re
from importlib.resources import files

import pytest
import redis

from common import redis_keys
from common.lua import key_names, source

ARGS = {"id": "job_abc", "lane": "normal.sd15", "priority": "5", "key_id": "key_x"}
ARGS |= {"status": "running", "day": "2026-12-03"}


@pytest.mark.parametrize("name", sorted(redis_keys.LUA_NAMES))
def test_each_lua_name_is_the_python_name(rclient: redis.Redis, name: str) -> None:
    spec = redis_keys.LUA_NAMES[name]
    if isinstance(spec, str):
        expected, call = spec, name
    else:
        build, params = spec
        values = [ARGS[param] for param in params]
        expected = build(*values)
        call = f"{name}({', '.join(repr(v) for v in values)})"
    assert rclient.eval(key_names() + f"return {call}", 0) == expected


def test_the_lua_files_spell_no_key_name() -> None:
    """Every name comes from the generated table: a literal would drift from the Python."""
    for path in files("common.lua").iterdir():
        if not path.name.endswith(".lua"):
            continue
        code = "\n".join(line.split("--", 1)[0] for line in path.read_text().splitlines())
        assert not re.search(r"['\"]sdq:", code), f"{path.name} spells a key name"


def test_every_step_compiles_with_the_names(rclient: redis.Redis) -> None:
    for path in files("common.lua").iterdir():
        if path.name.endswith(".lua") and path.name != "lib.lua":
            rclient.script_load(source(path.name.removesuffix(".lua")))
