"""The classroom exercises (EXERCISES.md, exercises/): the stubs hold no solution; the grader (`pytest --exercise`)
passes the reference code copied into them and fails the untouched stubs for the right reason; train.py runs on a
student's functions. Also two claims the exercises grade that no other test pinned (the _foreach teacher update,
the multi-crop batching)."""
import ast
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import exercises
import train
import variants  # noqa: F401  (lab/variants.py: the lab's datasets; the tiny runs here draw from "shapes")
import vit
from head import DINOHead

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES = exercises.EXERCISES


def solve_with_the_reference(directory):
    """The exercise files with the reference code in place of each stub: the answer key is the repository itself."""
    os.makedirs(directory, exist_ok=True)
    for ex in EXERCISES.values():
        imports, functions = {"import torch"}, []  # torch: for the decorators
        for function, target in ex.replaces.items():
            original = exercises.reference(target)[2]
            for name, value in inspect.getclosurevars(inspect.unwrap(original)).globals.items():  # what it uses
                if inspect.ismodule(value):
                    imports.add(f"import {value.__name__}" + (f" as {name}" if name != value.__name__ else ""))
                else:
                    imports.add(f"from {original.__module__} import {name}")
            source = textwrap.dedent(inspect.getsource(original))  # decorators included
            functions.append(re.sub(rf"\bdef {original.__name__}\(", f"def {function}(", source, count=1))
        with open(os.path.join(directory, ex.file), "w") as f:
            f.write("\n".join(sorted(imports)) + "\n\n\n" + "\n\n".join(functions))
    return str(directory)


# `python -m pytest --exercise all [--exercise_dir DIR] TESTS`, as an instructor runs it, twice: on DIR and on the
# shipped stubs. pytest.main twice in one process (test modules are imported once; each test's monkeypatch is undone)
# saves a second start of torch.
GRADER = """import sys, pytest
solved_xml, stubs_xml, directory, *tests = sys.argv[1:]
solved = pytest.main(["--exercise", "all", "-q", "--junitxml", solved_xml, f"--exercise_dir={directory}", *tests])
stubs = pytest.main(["--exercise", "all", "-q", "--junitxml", stubs_xml, *tests])
print("exit codes", int(solved), int(stubs))
"""


def junit_cases(xml):
    """{test: [failure message or None, per test case]} from pytest's --junitxml file."""
    cases = {}
    for case in ET.parse(xml).iter("testcase"):
        test = f"{case.get('classname').replace('.', '/')}.py::{case.get('name').split('[')[0]}"
        failed = [e for e in case if e.tag in ("failure", "error")]
        cases.setdefault(test, []).append(failed[0].get("message") if failed else None)
    return cases


def check_the_grader(tmp_path, tests):
    solved = solve_with_the_reference(tmp_path / "solved")
    proc = subprocess.run([sys.executable, "-c", GRADER, str(tmp_path / "solved.xml"), str(tmp_path / "stubs.xml"),
                           solved, *tests], cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "exit codes 0 1" in out, out[-3000:]  # all pass; some fail
    assert "Traceback" not in out
    passed, failed = junit_cases(tmp_path / "solved.xml"), junit_cases(tmp_path / "stubs.xml")
    assert set(passed) == set(failed) == set(tests)
    assert all(message is None for messages in passed.values() for message in messages), passed
    for test, messages in failed.items():
        own = [f"({name})" for name, ex in EXERCISES.items() if test in ex.tests]
        for message in messages:  # every case fails on a stub of one of the test's own exercises, nothing else
            assert message and message.startswith("not implemented yet: exercise"), (test, message)
            assert any(o in message for o in own), (test, message)


def test_the_grader_passes_the_reference_copied_into_the_stubs_and_fails_the_untouched_stubs(tmp_path):
    check_the_grader(tmp_path, [ex.tests[0] for ex in EXERCISES.values()])  # the quickest test of each exercise


@pytest.mark.slow
def test_the_grader_passes_and_fails_every_test_of_every_exercise(tmp_path):
    check_the_grader(tmp_path, sorted({test for ex in EXERCISES.values() for test in ex.tests}))


def test_an_unknown_exercise_is_a_one_line_usage_error_of_pytest():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--exercise", "los"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 4 and "unknown exercise 'los' (choose from loss, center" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_each_stub_has_the_signature_of_the_reference_and_each_exercise_names_tests_that_exist():
    assert sorted(f for f in os.listdir(exercises.HERE) if f.startswith("ex")) == sorted(
        ex.file for ex in EXERCISES.values())
    for name, ex in EXERCISES.items():
        module = exercises.load(name)
        for function, target in ex.replaces.items():
            reference = exercises.reference(target)[2]
            assert inspect.signature(getattr(module, function)) == inspect.signature(reference), (name, function)
        for test in ex.tests:
            path, function = test.split("::")
            with open(os.path.join(REPO, path)) as f:
                assert function in {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}, test


def test_the_stubs_hold_no_solution_only_a_docstring_citing_the_paper_and_a_raise():
    for name, ex in EXERCISES.items():
        assert sorted(exercises.unwritten(name)) == sorted(ex.replaces), name  # docstring + raise, nothing else
        module = exercises.load(name)
        assert "Sec." in module.__doc__ and f"--exercise {name}" in module.__doc__
        for function, target in ex.replaces.items():
            assert f"Replaces `{target.replace(':', '.')}`" in " ".join(getattr(module, function).__doc__.split())


def test_install_refuses_unknown_and_unwritten_exercises_in_one_line_and_replaces_nothing():
    before = train.update_teacher
    with pytest.raises(exercises.ExerciseError, match=r"^unknown exercise 'lose' \(choose from loss, center"):
        exercises.install(["lose"])
    with pytest.raises(train.UserError, match=r"^exercise teacher \(update_teacher in ex4_teacher.py\) not written"):
        exercises.install(["teacher"], error=train.UserError)  # what train.py --exercise turns into one line
    assert train.update_teacher is before


def test_the_capstone_trains_on_the_students_functions(tmp_path, monkeypatch):
    solved = solve_with_the_reference(tmp_path / "solved")
    for owner, attr, _ in exercises.replacements(list(EXERCISES), solved):
        monkeypatch.setattr(owner, attr, getattr(owner, attr))  # so that the test undoes what install does
    assert exercises.install(["all"], solved) == list(EXERCISES)
    for ex in EXERCISES.values():
        for target in ex.replaces.values():
            assert exercises.reference(target)[2].__module__.startswith("_exercise_"), target
    folder = data.make_folder_dataset(str(tmp_path / "imgs"), n_train=8, n_val=10, size=32, variant="shapes")
    train.main(train.get_args(["--data", folder, "--arch", "vit_tiny", "--patch", "8", "--depth", "1",
                               "--out_dim", "32", "--global_size", "32", "--local_size", "16",
                               "--local_crops_number", "2", "--batch_size", "8", "--epochs", "1",
                               "--num_workers", "0", "--knn_every", "1", "--precision", "fp32",
                               "--output_dir", str(tmp_path / "out")]))
    log = json.loads(open(tmp_path / "out" / "log.txt").readline())
    assert torch.isfinite(torch.tensor([log["loss"], log["teacher_entropy"], log["knn_top1"]])).all()


class CountOps(TorchDispatchMode):
    """The tensor operations (aten kernels) run inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_teacher_update_is_a_few_foreach_kernels_not_a_loop_over_parameters():
    torch.manual_seed(0)
    student = [torch.randn(4, 3) for _ in range(40)]
    teacher = [torch.randn(4, 3) for _ in range(40)]
    expected = [0.9 * t + 0.1 * s for t, s in zip(teacher, student)]
    with CountOps() as count:
        train.update_teacher(teacher, student, 0.9)
    assert len(count.ops) <= 3 and all("_foreach_" in op for op in count.ops), count.ops[:6]  # not 2 per tensor
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e)


def test_multicrop_wrapper_runs_the_backbone_once_per_resolution_and_keeps_the_view_order():
    torch.manual_seed(0)
    backbone = vit.vit_tiny(patch_size=8, depth=1, img_size=32).eval()
    head = DINOHead(backbone.embed_dim, 16, hidden_dim=32, bottleneck_dim=8)
    model = train.MultiCropWrapper(backbone, head)
    crops = [torch.randn(3, 3, size, size) for size in (32, 32, 16, 16, 16)]  # B = 3 images, 2 global + 3 local views
    calls = []
    for module in (backbone, head):
        module.register_forward_hook(lambda m, inputs, output: calls.append((m, inputs[0].shape[0])))
    with torch.no_grad():
        out = model(crops)  # (5·3, 16)
        assert calls == [(backbone, 6), (backbone, 9), (head, 15)]  # one call per resolution, the head once
        model(crops[:2])  # the teacher's call: the global views only
        assert calls[3:] == [(backbone, 6), (head, 6)]
        expected = torch.cat([head(backbone(c)) for c in crops])  # view by view: rows v·B ... v·B+B-1 are view v
    torch.testing.assert_close(out, expected)
