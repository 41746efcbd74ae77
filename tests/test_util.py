"""kat_core.util's process policies: a stage's or a `kat` command's exit without the final garbage collection."""

import subprocess
import sys


def test_short_lived_gc_keeps_exit_handlers_and_code():
    # a handler registered before the call runs after it: the objects are frozen by then; the exit code, the
    # other handlers and their output are as before
    code = ("import atexit, gc, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
            "from kat_core.util import short_lived_gc; short_lived_gc(); short_lived_gc(); "
            "print('done'); sys.exit(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "done\nfrozen True\n", "")
