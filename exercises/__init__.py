"""Classroom exercises (EXERCISES.md): eight pieces of DINO a student writes, graded by the project's own tests.

Each file exN_*.py holds the signature of one or two functions of the reference code, a docstring with the equation,
the paper section and the shapes, hints, and `raise NotImplementedError`. This module knows where each goes:

    python -m pytest --exercise loss              # tests/conftest.py: the tests of `loss`, run on your ex1_loss.py
    python -m pytest --exercise all --junitxml=grades.xml
    install(["loss", "center"])                   # train.py --exercise: train with your functions in place

EXERCISES is the one table: name -> file, the reference each function replaces ("module:Qualified.name"), and the
existing tests ("test file::test function") that grade it, the quickest first.
"""
import ast
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class ExerciseError(ValueError):
    """An unknown exercise name, an unwritten exercise or an exercise file that does not import: one line."""


@dataclass(frozen=True)
class Exercise:
    number: int
    file: str  # in the exercises folder
    replaces: dict  # function name in the file -> "module:Qualified.name" of the reference code it stands in for
    tests: tuple  # "tests/test_x.py::test_name": the project's tests that grade it, the quickest first
    paper: str


LOSS, TRAIN = "tests/test_loss.py::", "tests/test_train.py::"
FAST, KNN = "tests/test_fast_paths.py::", "tests/test_eval_knn.py::"
HEAD, ATTN, EX = "tests/test_head.py::", "tests/test_visualize_attention.py::", "tests/test_exercises.py::"
EXERCISES = {
    "loss": Exercise(1, "ex1_loss.py", {"forward": "loss:DINOLoss.forward"}, (
        LOSS + "test_loss_equals_a_direct_evaluation_of_eq3_over_three_steps_with_the_centre",
        LOSS + "test_a_view_is_never_its_own_target",
        LOSS + "test_collapse_statistics_kl_is_cross_entropy_minus_teacher_entropy",
        LOSS + "test_centering_alone_drives_the_teacher_towards_uniform",
        LOSS + "test_sharpening_alone_drives_the_teacher_towards_one_hot",
        LOSS + "test_centering_and_sharpening_together_stay_in_between",
        FAST + "test_official_double_loop_loss_equals_ours_and_updates_the_same_center",
        FAST + "test_our_step_and_the_official_step_give_the_same_losses_in_fp32"), "Sec. 3.1, Eq. 1-3"),
    "center": Exercise(2, "ex2_center.py", {"update_center": "loss:DINOLoss.update_center"}, (
        LOSS + "test_the_centre_is_the_ema_of_raw_teacher_logits_and_starts_at_zero",
        LOSS + "test_with_centre_momentum_0_the_centre_is_the_last_batch_mean",
        LOSS + "test_loss_equals_a_direct_evaluation_of_eq3_over_three_steps_with_the_centre",
        LOSS + "test_centering_alone_drives_the_teacher_towards_uniform",
        LOSS + "test_centering_and_sharpening_together_stay_in_between"), "Sec. 3.1 'Avoiding collapse', Eq. 4"),
    "temperature": Exercise(3, "ex3_temperature.py", {"teacher_temp_schedule": "loss:teacher_temp_schedule"}, (
        LOSS + "test_teacher_temperature_warms_up_linearly_then_stays_constant",
        LOSS + "test_loss_equals_a_direct_evaluation_of_eq3_over_three_steps_with_the_centre",
        LOSS + "test_sharpening_alone_drives_the_teacher_towards_one_hot"), "Sec. 3.1, 3.2, App. Table 9"),
    "teacher": Exercise(4, "ex4_teacher.py", {"update_teacher": "train:update_teacher"}, (
        TRAIN + "test_momentum_teacher_update_is_the_ema_formula",
        FAST + "test_foreach_ema_equals_the_python_loop_over_parameters",
        EX + "test_the_teacher_update_is_a_few_foreach_kernels_not_a_loop_over_parameters",
        FAST + "test_our_step_and_the_official_step_give_the_same_losses_in_fp32"), "Sec. 3.1 'Teacher network'"),
    "head": Exercise(5, "ex5_head.py", {"weight_norm_forward": "head:WeightNormLinear.forward",
                                        "forward": "head:DINOHead.forward"}, (
        HEAD + "test_with_norm_last_layer_each_output_is_a_cosine_to_a_unit_prototype",
        HEAD + "test_a_free_gain_scales_each_prototype_row_by_its_own_g",
        HEAD + "test_official_weight_g_and_weight_v_load_and_define_w_equals_g_v_over_norm_v"),
        "Sec. 3.1 'Network architecture', App."),
    "multicrop": Exercise(6, "ex6_multicrop.py", {"forward": "train:MultiCropWrapper.forward"}, (
        EX + "test_multicrop_wrapper_runs_the_backbone_once_per_resolution_and_keeps_the_view_order",
        TRAIN + "test_teacher_gets_no_gradients_and_sees_only_the_global_crops",
        TRAIN + "test_only_the_students_global_views_drop_patches_the_teacher_sees_them_whole"),
        "Sec. 3.1 'Multi-crop', App."),
    "knn": Exercise(7, "ex7_knn.py", {"knn_classifier": "eval_knn:knn_classifier"}, (
        KNN + "test_temperature_decides_between_the_nearest_neighbour_and_the_majority",
        KNN + "test_top5_counts_only_k_predictions_when_k_is_below_5",
        KNN + "test_any_number_of_test_images_and_classes_matches_the_reference",
        KNN + "test_k_larger_than_the_training_set_uses_every_training_image",
        KNN + "test_knn_monitor_separates_dark_from_light_and_restores_train_mode"), "Sec. 3.2 'Evaluation'"),
    "attention": Exercise(8, "ex8_attention.py", {"mass_mask": "visualize_attention:mass_mask"}, (
        ATTN + "test_mass_threshold_keeps_the_top_patches_holding_60_percent",
        ATTN + "test_mass_threshold_with_a_tie_keeps_one_of_the_equal_patches",
        ATTN + "test_mass_threshold_keeps_the_smallest_set_of_top_patches_with_enough_mass",
        ATTN + "test_uniform_attention_keeps_that_fraction_of_the_patches"), "Sec. 4.2.2, Fig. 4"),
}


def resolve(names):
    """['loss,center', 'all'] -> the exercise names in paper order; an unknown name raises ExerciseError."""
    wanted = {n.strip() for name in names for n in name.split(",") if n.strip()}
    unknown = sorted(wanted - set(EXERCISES) - {"all"})
    if unknown:
        raise ExerciseError(f"unknown exercise {', '.join(map(repr, unknown))} (choose from "
                            f"{', '.join(EXERCISES)}, or all)")
    return [n for n in EXERCISES if n in wanted or "all" in wanted]


def folder(directory=None):
    return os.path.realpath(directory or HERE)


def load(name, directory=None):
    """The student's module of exercise `name`, imported from its file (in `directory`, default this folder)."""
    path = os.path.join(folder(directory), EXERCISES[name].file)
    module_name = f"_exercise_{abs(hash(path))}_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a student's syntax error or bad import: say where, in one line
        raise ExerciseError(f"{path} does not import: {type(e).__name__}: {e}") from None
    sys.modules[module_name] = module
    return module


def reference(target):
    """'loss:DINOLoss.forward' -> (owner, attribute name, the reference function): setattr(owner, name, f) swaps."""
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *outer, attr = qualname.split(".")
    for part in outer:
        owner = getattr(owner, part)
    return owner, attr, vars(owner)[attr]  # vars: the plain function, not a bound or inherited one


def replacements(names, directory=None):
    """[(owner, attribute, student's function)] for the exercises `names`: the reference attribute, and every
    global of an imported project module bound to the same function (`from loss import teacher_temp_schedule`)."""
    changes = {}
    for name in names:
        module = load(name, directory)
        for function, target in EXERCISES[name].replaces.items():
            owner, attr, original = reference(target)
            new = getattr(module, function, None)
            if not callable(new):
                raise ExerciseError(f"{module.__file__} has no function {function} (exercise {name})")
            changes[id(owner), attr] = (owner, attr, new)
            for other in list(sys.modules.values()):
                path = os.path.realpath(getattr(other, "__file__", None) or "/")
                if path.startswith(REPO + os.sep) and not path.startswith(HERE + os.sep):
                    for key, value in list(vars(other).items()):
                        if value is original:
                            changes[id(other), key] = (other, key, new)
    return list(changes.values())


def unwritten(name, directory=None):
    """The functions of exercise `name` whose body is still the stub's: a docstring and `raise NotImplementedError`."""
    path = os.path.join(folder(directory), EXERCISES[name].file)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    stubs = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in EXERCISES[name].replaces:
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            raised = body[0].exc if len(body) == 1 and isinstance(body[0], ast.Raise) else None
            raised = raised.func if isinstance(raised, ast.Call) else raised
            if isinstance(raised, ast.Name) and raised.id == "NotImplementedError":
                stubs.append(node.name)
    return stubs


def stub_message(exc, tb, directory=None):
    """If `exc` is a NotImplementedError raised by an exercise file, the one line to show instead of its traceback."""
    if not isinstance(exc, NotImplementedError) or tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next  # the innermost frame: the function that raised
    path = os.path.realpath(tb.tb_frame.f_code.co_filename)
    for name, ex in EXERCISES.items():
        if path == os.path.join(folder(directory), ex.file):
            function = tb.tb_frame.f_code.co_name
            what = ex.replaces.get(function, "?").split(":")[-1]
            return (f"not implemented yet: exercise {ex.number} ({name}), {function} in {os.path.relpath(path)} "
                    f"(line {tb.tb_lineno}), which stands in for {what}")
    return None


def install(names, directory=None, error=ExerciseError):
    """Put the student's functions of the exercises `names` ('all' for every one) in place of the reference ones,
    for the rest of this process (train.py --exercise). Raises `error` with one line when a name is unknown or an
    exercise is still a stub; nothing is replaced then. Returns the names installed."""
    try:
        names = resolve(names)
        stubs = [f"{n} ({', '.join(unwritten(n, directory))} in {EXERCISES[n].file})" for n in names
                 if unwritten(n, directory)]
        if stubs:
            raise ExerciseError(f"exercise {'; '.join(stubs)} not written yet: write it, check it with "
                                "`python -m pytest --exercise NAME`, or leave it out of --exercise")
        changes = replacements(names, directory)
    except ExerciseError as e:
        raise error(str(e)) from None
    for owner, attr, new in changes:
        setattr(owner, attr, new)
    if names:
        print(f"exercises: using your {', '.join(names)} from {folder(directory)}", file=sys.stderr)
    return names
