"""Lua shared by the Redis scripts."""

#: `now_ms(arg)`: the caller's clock when `arg` is given (tests pin time), else Redis's own
#: `TIME`, so hosts whose clocks disagree still agree on "now"
NOW_LUA = """
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""


def as_function(name: str, script: str) -> str:
    """`script` (a whole script, as registered on its own) as `local function name(KEYS, ARGV)`.

    Scripts compose without copying their logic: a combined script calls each piece with its
    own slice of keys and arguments (`slice`), and each piece keeps one source of truth.
    """
    return f"local function {name}(KEYS, ARGV)\n{script}\nend\n"


#: `slice(t, from, n)`: `n` items of `t` from index `from` (a piece's KEYS or ARGV in a combined script)
SLICE_LUA = """
local function slice(t, from, n)
  local out = {}
  for i = 1, n do out[i] = t[from + i - 1] end
  return out
end
"""
