"""The --exercise switch: run the project's own tests of a classroom exercise on the student's code (EXERCISES.md).

    python -m pytest --exercise loss                 # the tests of exercise `loss`, on exercises/ex1_loss.py
    python -m pytest --exercise loss,center -v       # several (or --exercise loss --exercise center)
    python -m pytest --exercise all --junitxml=grades.xml      # an instructor's grade sheet; exit code 0: all pass

Only the tests listed for those exercises in exercises.EXERCISES run. During each test, the student's functions of
that test's exercises stand in for the reference ones (monkeypatch, undone after the test), so a test grades its
own exercise against the reference code of the others. An untouched stub fails with one line saying it is not
implemented yet. Without --exercise nothing here changes anything: the suite tests the reference code.
"""
import os

import pytest

import exercises

CHOSEN = pytest.StashKey[list]()  # the exercises asked for on the command line
OF_TEST = pytest.StashKey[list]()  # per test: the chosen exercises it grades


def pytest_addoption(parser):
    group = parser.getgroup("exercises", "classroom exercises (EXERCISES.md)")
    group.addoption("--exercise", action="append", default=[], metavar="NAME",
                    help="run only the tests of exercise NAME on your code in exercises/ "
                         f"({', '.join(exercises.EXERCISES)}"
                         ", or all; comma-separated or repeated)")
    group.addoption("--exercise_dir", default=None, metavar="DIR",
                    help="folder holding the exercise files instead of exercises/ (e.g. a student's hand-in)")


def pytest_configure(config):
    names = config.getoption("exercise")
    if not names:
        return
    directory = config.getoption("exercise_dir")
    try:
        chosen = exercises.resolve(names)
        for name in chosen:
            exercises.load(name, directory)  # a syntax error in a hand-in is a one-line usage error, not a crash
    except exercises.ExerciseError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[CHOSEN] = chosen
    if config.option.tbstyle == "auto":
        config.option.tbstyle = "short"  # a student reads the failing line and the assertion, not a traceback wall


def _test_id(config, path, name):
    return f"{os.path.relpath(path, config.rootpath).replace(os.sep, '/')}::{name}"


def pytest_ignore_collect(collection_path, config):
    chosen = config.stash.get(CHOSEN, None)
    if chosen and collection_path.is_file() and collection_path.name.startswith("test_"):
        files = {t.split("::")[0] for name in chosen for t in exercises.EXERCISES[name].tests}
        if _test_id(config, collection_path, "").rstrip(":") not in files:
            return True  # no test of the chosen exercises in this file: do not even import it
    return None


def pytest_collection_modifyitems(config, items):
    chosen = config.stash.get(CHOSEN, None)
    if not chosen:
        return
    selected, deselected = [], []
    for item in items:
        key = _test_id(config, item.path, getattr(item, "originalname", item.name))
        of = [name for name in chosen if key in exercises.EXERCISES[name].tests]
        item.stash[OF_TEST] = of
        item.user_properties.extend(("exercise", name) for name in of)  # in --junitxml, per test case
        (selected if of else deselected).append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = selected


@pytest.fixture(autouse=True)
def _student_code(request, monkeypatch):
    """With --exercise: the student's functions of this test's exercises in place of the reference, for this test."""
    names = request.node.stash.get(OF_TEST, None)
    if names:
        for owner, attr, new in exercises.replacements(names, request.config.getoption("exercise_dir")):
            monkeypatch.setattr(owner, attr, new)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and item.stash.get(OF_TEST, None):
        message = exercises.stub_message(call.excinfo.value, call.excinfo.tb, item.config.getoption("exercise_dir"))
        if message:
            report.longrepr = message  # "not implemented yet", in the summary line and in junit's message
