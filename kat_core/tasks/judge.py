"""The trusted side of a code verification, and the wire between it and the candidate.

A candidate program and the benchmark's tests never share a process. `sandbox.run_tests` starts two
sandboxed children under different uids:

- the **candidate** runs the model's code, then `serve()`: it reads calls (function name, arguments)
  from a pipe, calls its own function and writes back the result as plain data;
- the **judge** runs the benchmark's tests, in which each function under test is a stub (`_Stub`) that
  sends the call over the pipe and returns the decoded result; when the tests have run to their end it
  prints `VERDICT_PASS` on its own stdout, which only the parent reads.

Why: anything inside the candidate's process can be subverted (an always-true `__eq__`, an int subclass,
patched builtins, `sys.exit` before the tests, a forged success marker, edited test code). The judge only
ever sees values rebuilt by `decode` from JSON, which are genuine built-in objects (`type(x) is int`,
never a subclass), so every comparison the tests make is the built-in one. The candidate learns the
arguments of its calls and nothing else: the tests and their expected values stay in the judge.

Wire format (one JSON document per line): None, bools, ints, floats (NaN and infinities included) and
strings as themselves; a list as a JSON array; everything else as a one-key object: {"t": [...]} tuple,
{"s": [...]} set, {"f": [...]} frozenset, {"d": [[k, v], ...], "cls": ...} dict (cls: Counter,
OrderedDict or defaultdict, rebuilt as that stdlib type), {"c": [re, im]} complex, {"b": hex} bytes,
{"q": [...]} deque, {"g": [start, stop, step]} range, {"i": [...]} an iterator (a generator, map, zip:
drained, rebuilt as an iterator over its items), {"o": [type name, repr]} anything else (rebuilt as an
`Opaque`, equal only to itself). Exact type checks on the way out, so an int subclass travels as opaque.
Ints travel as JSON numbers, so one of more than 4300 digits (Python's default limit for int/str
conversion) cannot be sent: such a result fails its test.

This file is stdlib-only and is pasted verbatim into both programs (they run `python -I -S`, without our
packages), so it must run on any Python >= 3.8: no `match`, no `X | Y` types at run time. It imports
next to nothing at start, because both processes pay for it on every item: `json` pulls in `re` (~30 ms
in the sandbox), so the C scanner and encoder of `_json` are used directly when they behave as expected,
and `collections` is only touched when a value needs it.
"""

import sys

VERDICT_PASS = "KAT-JUDGE: all tests ran and passed"
PING = "__kat_ping__"  # the judge's first call: answered once the candidate's program has run to its end
MAX_LINE_BYTES = 16 << 20  # a reply longer than this is a protocol error (fails the item)
MAX_DEPTH = 200  # nesting deeper than this is refused (and stops reference cycles)
_DICT_CLASSES = ("dict", "Counter", "OrderedDict", "defaultdict")  # defaultdict comes back a plain dict
MAX_ITEMS = 1_000_000  # an iterator the candidate returns is drained up to this many items
_ITERATORS = (type(x for x in ()), map, filter, zip, enumerate, reversed, type(iter([])), type(iter(())),
              type(iter("")), type(iter(range(0))), type(iter({})), type(iter(set())), type(reversed([])),
              type(iter({}.values())), type(iter({}.items())))


class WireError(Exception):
    """The other side sent something that is not a valid message."""


class CandidateError(Exception):
    """The candidate's function raised an exception that is not a built-in Exception type."""


class Opaque:
    """A value the wire cannot carry as plain data (a regex match, a custom object). Truthy and equal only
    to itself, so it can satisfy `assert f(x)` (as `True` could) but no comparison with an expected value."""

    def __init__(self, type_name, text):
        self.type_name, self.text = str(type_name), str(text)

    def __repr__(self):
        return f"<opaque {self.type_name}: {self.text}>"


def encode(value, depth=0):
    """A JSON-able tree for `value` (see the module docstring)."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deep")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return value
    if t is float:
        return value
    d = depth + 1
    if t is list:
        return [encode(v, d) for v in value]
    if t is tuple:
        return {"t": [encode(v, d) for v in value]}
    if t is set:
        return {"s": [encode(v, d) for v in value]}
    if t is frozenset:
        return {"f": [encode(v, d) for v in value]}
    # a Counter, deque, ... can only exist if collections was imported, so no import here
    col = sys.modules.get("collections")
    if t is dict or (col is not None and t in (col.Counter, col.OrderedDict, col.defaultdict)):
        return {"d": [[encode(k, d), encode(v, d)] for k, v in value.items()], "cls": t.__name__}
    if col is not None and t is col.deque:
        return {"q": [encode(v, d) for v in value]}
    if t is complex:
        return {"c": [value.real, value.imag]}
    if t is bytes or t is bytearray:
        return {"b": bytes(value).hex()}
    if t is range:
        return {"g": [value.start, value.stop, value.step]}
    if t in _ITERATORS:  # a generator, map, zip, ...: its items, rebuilt as an iterator over them
        items = []
        for v in value:
            if len(items) >= MAX_ITEMS:
                raise WireError(f"an iterator with more than {MAX_ITEMS} items")
            items.append(encode(v, d))
        return {"i": items}
    try:
        text = object.__repr__(value)  # not the object's own __repr__: that is candidate code
    except Exception:
        text = "?"
    return {"o": [t.__module__ + "." + t.__qualname__, text[:200]]}


def decode(node, depth=0):
    """The built-in value a wire tree stands for; WireError for anything malformed."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deep")
    t = type(node)
    if node is None or t is bool or t is str or t is int or t is float:
        return node
    d = depth + 1
    if t is list:
        return [decode(v, d) for v in node]
    if t is not dict:
        raise WireError(f"unexpected JSON value of type {t.__name__}")
    keys = set(node)
    try:
        if keys == {"t"}:
            return tuple(decode(v, d) for v in _array(node["t"]))
        if keys == {"s"}:
            return {decode(v, d) for v in _array(node["s"])}
        if keys == {"f"}:
            return frozenset(decode(v, d) for v in _array(node["f"]))
        if keys == {"q"}:
            import collections

            return collections.deque(decode(v, d) for v in _array(node["q"]))
        if keys == {"d", "cls"} and node["cls"] in _DICT_CLASSES:
            pairs = dict((decode(k, d), decode(v, d)) for k, v in (_pair(p) for p in _array(node["d"])))
            if node["cls"] in ("Counter", "OrderedDict"):
                import collections

                return getattr(collections, node["cls"])(pairs)  # from a dict: Counter(pairs) would count them
            return pairs
        if keys == {"c"}:
            re_, im = _pair(node["c"])
            if type(re_) not in (int, float) or type(im) not in (int, float):
                raise WireError("complex parts must be numbers")
            return complex(re_, im)
        if keys == {"b"} and type(node["b"]) is str:
            return bytes.fromhex(node["b"])
        if keys == {"i"}:
            return iter([decode(v, d) for v in _array(node["i"])])
        if keys == {"g"} and all(type(x) is int for x in _array(node["g"])) and len(node["g"]) == 3:
            return range(*node["g"])
        if keys == {"o"}:
            name, text = _pair(node["o"])
            return Opaque(name, text)
    except TypeError as exc:  # an unhashable set member or dict key
        raise WireError(str(exc)) from None
    except ValueError as exc:  # bad hex
        raise WireError(str(exc)) from None
    raise WireError(f"unknown wire object with keys {sorted(keys)}")


def _array(node):
    if type(node) is not list:
        raise WireError("expected a JSON array")
    return node


def _pair(node):
    node = _array(node)
    if len(node) != 2:
        raise WireError("expected a pair")
    return node[0], node[1]


_CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class _ScanContext:
    # what _json.make_scanner reads from a json.JSONDecoder: plain JSON, NaN and infinities allowed
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_CONSTANTS.__getitem__)


def _fast_codec():
    """(dumps, loads) on `_json`'s C functions, checked on a sample; None where they differ from json's."""
    try:
        import _json

        encoder = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ":", ",", False, False, True)
        scanner = _json.make_scanner(_ScanContext())

        def fast_dumps(obj):
            return "".join(encoder(obj, 0))

        def fast_loads(text):
            value, end = scanner(text, 0)
            if text[end:].strip():
                raise ValueError("extra data after the JSON value")
            return value

        sample = [None, True, 1, -2.5, "\u00e9\n\"", [float("inf")], {"t": [1, "x"]}]
        text = fast_dumps(sample)
        back = fast_loads(text)
        if text != '[null,true,1,-2.5,"\\u00e9\\n\\"",[Infinity],{"t":[1,"x"]}]' or back != sample:
            return None
        return fast_dumps, fast_loads
    except Exception:  # another Python's internals: the json module it is
        return None


_FAST = _fast_codec()


def dumps(message):
    # NaN and infinities are legitimate float results; ASCII output escapes lone surrogates
    if _FAST is not None:
        return (_FAST[0](message) + "\n").encode("ascii")
    import json

    return (json.dumps(message, allow_nan=True, ensure_ascii=True) + "\n").encode("ascii")


def loads(line):
    if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
        raise WireError("the candidate's reply is too long or cut off (it exited or crashed?)")
    try:
        text = line.decode("ascii")
        if _FAST is not None:
            return _FAST[1](text)
        import json

        return json.loads(text)
    except (ValueError, StopIteration, RecursionError) as exc:  # StopIteration: the C scanner found no value
        raise WireError(f"the reply is not JSON: {exc!r}") from None


# --- the candidate side (runs after the candidate's code, in its process) -----------------------------

def serve(read_fd, write_fd, namespace):
    """Answer calls until the judge closes the pipe. Nothing here is trusted: the candidate may replace
    it; the judge only believes what `decode` rebuilds."""
    reader = open(read_fd, "rb")  # open() takes an fd: no need to import os
    writer = open(write_fd, "wb")
    for line in reader:
        request = loads(line)
        if request["f"] == PING:
            writer.write(dumps({"r": None}))
            writer.flush()
            continue
        try:
            func = namespace[request["f"]]
            result = func(*decode(request["a"]), **decode(request["k"]))
            reply = {"r": encode(result)}
        except BaseException as exc:  # SystemExit too: raised inside a call, it is the call's outcome
            try:
                message = str(exc)[:1000]
            except BaseException:
                message = ""
            reply = {"e": [type(exc).__name__, message]}
        try:
            data = dumps(reply)
        except (ValueError, RecursionError) as exc:
            data = dumps({"e": ["WireError", f"result cannot be sent: {exc}"]})
        writer.write(data)
        writer.flush()


# --- the judge side -----------------------------------------------------------------------------------

class _Connection:
    def __init__(self, write_fd, read_fd):
        self.writer = open(write_fd, "wb")
        self.reader = open(read_fd, "rb")
        self.calls = 0

    def call(self, name, args, kwargs):
        self.calls += 1
        try:
            self.writer.write(dumps({"f": name, "a": encode(list(args)), "k": encode(dict(kwargs))}))
            self.writer.flush()
        except (BrokenPipeError, OSError):
            raise WireError("the candidate is gone (it exited or crashed before answering)") from None
        reply = loads(self.reader.readline(MAX_LINE_BYTES + 1))
        if type(reply) is dict and set(reply) == {"r"}:
            return decode(reply["r"])
        if type(reply) is dict and set(reply) == {"e"}:
            name_, message = _pair(reply["e"])
            raise _exception(str(name_), str(message))
        raise WireError("malformed reply")


def _exception(type_name, message):
    """The exception the stub raises for one the candidate's function raised: the built-in Exception type
    of that name (a trusted class; never SystemExit or KeyboardInterrupt), else CandidateError.

    Never StopIteration or StopAsyncIteration either: those end an iteration rather than fail a call, so
    raised from a call inside map(), filter() or zip() in a test they would end its loop silently, skipping
    every assert left (PEP 479 makes them RuntimeError inside generators for the same reason)."""
    import builtins

    cls = getattr(builtins, type_name, None)
    if (isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins"
            and not issubclass(cls, (StopIteration, StopAsyncIteration))):
        try:
            return cls(message)
        except Exception:
            pass
    return CandidateError(f"{type_name}: {message}")


class _Stub:
    """Stands in for one of the candidate's functions inside the tests."""

    def __init__(self, connection, name):
        self.connection, self.__name__ = connection, name

    def __call__(self, *args, **kwargs):
        return self.connection.call(self.__name__, args, kwargs)


def judge(write_fd, read_fd, setup, tests, functions):
    """Run `setup` (trusted code the tests need, e.g. a HumanEval prompt's helpers), bind a stub for each
    name in `functions`, run `tests`; print the verdict only if they all ran."""
    connection = _Connection(write_fd, read_fd)
    try:
        connection.call(PING, (), {})  # the program must run to its end, as it would before tests
    except WireError:
        raise WireError("the candidate's program did not run to its end (it crashed or exited)") from None
    connection.calls = 0
    namespace = {"__name__": "__main__"}
    exec(compile(setup, "<setup>", "exec"), namespace)
    for name in functions:
        namespace[name] = _Stub(connection, name)
    exec(compile(tests, "<tests>", "exec"), namespace)
    print(f"\n{VERDICT_PASS} ({connection.calls} calls)", flush=True)
