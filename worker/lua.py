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
