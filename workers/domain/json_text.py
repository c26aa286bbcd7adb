"""JSON read so that what is kept from it can be written back and read by Redis's scripts.

A delivery nests a few levels; one nested hundreds deep (in a field the schema ignores) could be
read by the receiver but not carried by the worker: its messages are pickled to the pool, and
pickling recursed past Python's limit in the worker's main process, which then exited. So nothing
deeper than ``MAX_DEPTH`` is taken in (``nested_deeper_than``).

JSON may escape a lone UTF-16 surrogate (``"\\ud83d"``: an emoji a sender cut in half when it cut a
text to a length). Python reads it into a ``str`` that is not text: ``json.dumps`` writes the escape
back, and Redis's Lua ``cjson`` refuses to decode it, so a script reading the write kept for a key
failed on every later write of that key. Such a surrogate is read as U+FFFD, as a decoder reads any
other invalid sequence.
"""
import json
import re

_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_ESCAPED_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"
MAX_DEPTH = 32  # levels of objects and lists a delivery may nest (Locate2u's nest three)


# The same repair inside Redis's scripts, for what was kept before it was made: ``decoded(text)`` is
# ``cjson.decode(text)``, reading each surrogate escape as U+FFFD when cjson refuses the text.
LUA_DECODED = r"""
local function decoded(text)
  local ok, value = pcall(cjson.decode, text)
  if ok then return value end
  return cjson.decode((string.gsub(text, '\[uU][dD][89a-fA-F]%x%x', '\ufffd')))
end
"""


def loads(text):
    """``json.loads(text)`` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    value = json.loads(text)
    return repaired(value) if holds_escaped_surrogate(text) else value


def holds_escaped_surrogate(raw):
    """Whether the JSON text (``str`` or ``bytes``) escapes a surrogate: only then is there one to repair
    (``json.loads`` joins an escaped pair into one character; a lone one stays a surrogate)."""
    pattern = _ESCAPED_SURROGATE_BYTES if isinstance(raw, bytes) else _ESCAPED_SURROGATE
    return pattern.search(raw) is not None


def repaired(value):
    """``value`` (parsed JSON) with every surrogate left in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub(REPLACEMENT, value)
    if isinstance(value, list):
        return [repaired(item) for item in value]
    if isinstance(value, dict):
        return {repaired(key): repaired(item) for key, item in value.items()}
    return value


def nested_deeper_than(value, limit=MAX_DEPTH):
    """Whether ``value`` (parsed JSON) nests objects and lists more than ``limit`` levels deep (a flat
    object is one level). Walked without recursion."""
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if level > limit:
            return True
        pending.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return False
