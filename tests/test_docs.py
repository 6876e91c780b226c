"""README and EXERCISES agree with the code: the presets table, the help texts, and every flag they mention."""
import os
import re
import shlex
import subprocess
import sys

import pytest

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train.py", "eval_knn.py", "eval_linear.py", "visualize_attention.py", "eval_retrieval.py",
           "eval_video_segmentation.py", "benchmark.py", "data.py", "lab/plot_log.py", "lab/plot_samples.py",
           "lab/recipes.py"]


def read(name):
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def commands(text):
    """(script, [args]) for each `python X.py ...` / `torchrun ... X.py ...` line of the code blocks."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            words = shlex.split(line) if line else []
            for i, w in enumerate(words):
                if w in SCRIPTS:
                    yield w, words[i + 1:]
                    break


@pytest.fixture(scope="module")
def known_flags():
    # all the --help processes side by side: each spends its seconds importing torch (35 s one by one, 23 s so)
    procs = {script: subprocess.Popen([sys.executable, script, "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for script in SCRIPTS}
    flags = {}
    for script, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{script} --help failed: {stderr[-300:]}"
        flags[script] = set(re.findall(r"(--[a-z_0-9]+)", stdout))
    return flags


def test_the_presets_table_in_docs_is_the_one_generated_from_the_code():
    assert train.presets_table() in read("docs/cpu_recipe.md")


def test_every_preset_flag_has_help_that_states_both_preset_values():
    parser_help = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                                 timeout=120).stdout.replace("\n", " ")
    parser_help = re.sub(r"\s+", " ", parser_help)
    for key in train.PRESETS["paper"]:
        assert f"cpu: {train.PRESETS['cpu'][key]}; paper: {train.PRESETS['paper'][key]}" in parser_help, key


DOCS = ["README.md", "EXERCISES.md", "docs/cpu_recipe.md", "docs/scaling.md", "docs/experiments.md", "lab/README.md",
        "lab/notes/recipe.md", "lab/notes/speed.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_in_the_docs_exists_in_its_script(doc, known_flags):
    found = 0
    for script, args in commands(read(doc)):
        found += 1
        for word in args:
            if word.startswith("--"):
                assert word.split("=")[0] in known_flags[script], f"{doc}: {script} has no flag {word}"
    assert found > 0 or doc != "README.md"
