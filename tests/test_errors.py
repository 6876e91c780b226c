"""Kind to bad input: every script answers a mistake with one line on stderr and exit code 2."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv,message", [
    (["benchmark.py", "--arch", "vit_huge"], "unknown --arch"),
    (["benchmark.py", "--patch", "16", "--global_size", "100"], "does not divide"),
    (["eval_linear.py", "no_such_checkpoint.pth"], "not found"),
    (["visualize_attention.py", "no_such_checkpoint.pth", "--image", "docs/example.png"], "not found"),
])
def test_a_mistake_is_one_line_and_exit_code_2(argv, message):
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
