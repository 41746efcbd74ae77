"""The one CPU thread policy (kat_core.util.cpu_threads): 1 unless KAT_TORCH_THREADS or the launcher's
OMP_NUM_THREADS says otherwise, whether torch is imported before or after."""

import os
import subprocess
import sys

import pytest

SET, SHOW = "from kat_core.util import cpu_threads; n = cpu_threads()", "print(n, torch.get_num_threads())"
CODE = {"after": f"{SET}; import torch; {SHOW}", "before": f"import torch; {SET}; {SHOW}"}


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize(("env", "expected"), [({}, 1), ({"KAT_TORCH_THREADS": "2"}, 2), ({"OMP_NUM_THREADS": "2"}, 2),
                                                ({"KAT_TORCH_THREADS": "1", "OMP_NUM_THREADS": "2"}, 1)])
def test_cpu_threads_policy(order, env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("KAT_TORCH_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", CODE[order]], capture_output=True, text=True, env={**base, **env},
                         timeout=120, check=True).stdout.split()
    assert out == [str(expected), str(expected)]
