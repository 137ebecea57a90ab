"""Options are declared once (engine dataclass fields with nsd.engine.params.option): the click
options of train, label, balance and loop are built from the declarations, and the engine checks
a Python caller's values against the same ranges."""

import dataclasses

import click
import pytest

from nsd.cli.balance_cmd import balance as balance_cmd
from nsd.cli.label_cmd import label as label_cmd
from nsd.cli.loop_cmds import LOOP, LOOP_BALANCE, LOOP_LABEL, LOOP_TRAIN, loop as loop_cmd
from nsd.cli.options import Options
from nsd.cli.train_cmds import train as train_cmd
from nsd.engine.balance import BalanceParams
from nsd.engine.errors import UsageError
from nsd.engine.label import LabelParams
from nsd.engine.loop import LoopConfig
from nsd.engine.params import check_options, declared, option, option_name
from nsd.engine.train import TrainConfig


def _names(command) -> set[str]:
    return {name for p in command.params for name in (*p.opts, *p.secondary_opts)}


def _switches(field, spec) -> set[str]:
    names = set(spec.flag.split("/")) if spec.flag else {option_name(field, spec)}
    return names | ({spec.off} if spec.off else set())


@pytest.mark.parametrize("cls, command", [
    (TrainConfig, train_cmd), (LabelParams, label_cmd), (BalanceParams, balance_cmd), (LoopConfig, loop_cmd)])
def test_every_declared_option_is_an_option_of_its_command(cls, command):
    excluded = {"progress"} if cls is LabelParams else set()
    for field, spec in declared(cls):
        if field.name not in excluded:
            assert _switches(field, spec) <= _names(command), field.name


def test_the_loop_takes_every_train_label_and_balance_option_it_does_not_name_as_left_out():
    """A new option of train, label or balance is a loop option with no change to the loop."""
    names = _names(loop_cmd)
    # The loop leaves out only these (it names the models, pins the images, sets the device and
    # the progress of every step itself); anything declared later is taken.
    assert LOOP_TRAIN.excluded == {"name", "arch", "selection", "images", "device", "pretrained_file", "init_from",
                                   "eval_split", "save_every", "progress"}
    assert LOOP_LABEL.excluded == {"device", "num_workers", "progress"}
    assert LOOP_BALANCE.excluded == {"labels", "run"}
    assert {"--label-batch-size", "--batch-size", "--threshold", "--no-leakage-gate", "--leakage-distance",
            "--randaug-m", "--calibrate", "--sql"} <= names
    assert not {"--model", "--init-from", "--num-workers", "--run", "--labels"} & names


def _parse(command, args: list[str]) -> dict:
    with command.make_context(command.name, args) as ctx:
        return dict(ctx.params)


def test_the_loop_passes_each_option_to_its_step():
    kwargs = _parse(loop_cmd, ["--models", "test_resnet, resnet10t", "--iterations", "2", "--label-batch-size",
                               "32", "--batch-size", "16", "--randaug-m", "27", "--no-duplicate", "--hard",
                               "--no-leakage-gate", "--calibrate", "--epochs", "4", "--no-teacher-noise"])
    loop_opts, train, label, balance = (g.take(kwargs) for g in (LOOP, LOOP_TRAIN, LOOP_LABEL, LOOP_BALANCE))
    assert set(kwargs) == {"no_progress", "as_json"}  # every other option went to one step
    cfg = LoopConfig(**loop_opts)
    assert cfg.models == ("test_resnet", "resnet10t") and cfg.iterations == 2 and cfg.teacher_noise is False
    assert (train["batch_size"], train["randaug_m"], train["epochs"], train["steps"]) == (16, 27.0, 4, None)
    assert label["batch_size"] == 32 and label["calibrate"] is True and label["temperature"] == 1.0
    assert balance["duplicate"] is False and balance["hard"] is True and balance["leakage_distance"] is None
    defaults = LOOP_BALANCE.take(_parse(loop_cmd, ["--models", "a"]))
    assert defaults == {f.name: getattr(BalanceParams(), f.name) for f, _ in LOOP_BALANCE.fields}


@pytest.mark.parametrize("cls, command", [(TrainConfig, train_cmd), (LabelParams, label_cmd),
                                          (BalanceParams, balance_cmd), (LoopConfig, loop_cmd)])
def test_click_and_the_engine_refuse_the_same_values(cls, command):
    """At each bound of each declared range, and just outside it, both sides agree."""
    required = {"--model": "test_resnet", "--name": "m", "--teacher": "t", "--models": "a"}
    base = [x for name, value in required.items() if name in _names(command) for x in (name, value)]
    checked = 0
    for field, spec in declared(cls):
        if spec.choices or spec.flag or (spec.low is None and spec.high is None):
            continue
        step = 1 if spec.whole else 1e-6
        cases = []
        for bound, sign, is_open in ((spec.low, -1, spec.open in ("low", "both")),
                                     (spec.high, 1, spec.open in ("high", "both"))):
            if bound is not None:
                cases += [(bound, not is_open), (bound + sign * step, False)]
        for value, allowed in cases:
            value = int(value) if spec.whole else value
            args = [*base, option_name(field, spec), repr(value)]
            try:
                _parse(command, args)
                clicked = True
            except click.BadParameter:
                clicked = False
            assert clicked == allowed, (field.name, value)
            if spec.guarded:
                continue
            params = _instance(cls, **{field.name: value})
            if allowed:
                check_options(params)
            else:
                with pytest.raises(UsageError, match=f"^{option_name(field, spec)} must be "):
                    check_options(params)
            checked += 1
    assert checked >= 4


def _instance(cls, **values):
    required = {"name": "m", "arch": "test_resnet"} if cls is TrainConfig else {}
    return cls(**required, **values)


def test_a_new_option_is_one_declaration():
    """What adding `--mixup` to training takes: one field; the option, its range, its help and
    its engine check follow, for `nsd train` and the loop alike."""

    @dataclasses.dataclass
    class WithMixup(TrainConfig):
        mixup: float = option(0.0, "Mixup alpha (0: off).", low=0, high=10)

    @click.command()
    @Options(WithMixup, exclude=("name", "arch"))
    def command(**kwargs):
        pass

    assert "--mixup" in _names(command)
    mixup = next(p for p in command.params if p.name == "mixup")
    assert mixup.default == 0.0 and "Mixup alpha" in mixup.help
    group = Options(WithMixup, exclude=("name", "arch"))
    assert group.take(_parse(command, ["--mixup", "0.4"]))["mixup"] == 0.4
    with pytest.raises(click.BadParameter):
        _parse(command, ["--mixup", "11"])
    with pytest.raises(UsageError, match=r"^--mixup must be a number in \[0, 10\], got -1$"):
        check_options(WithMixup(name="m", arch="a", mixup=-1))


def test_a_group_refuses_names_its_class_does_not_declare():
    with pytest.raises(TypeError, match="TrainConfig declares no option"):
        Options(TrainConfig, exclude=("epoch",))


def test_an_off_switch_lets_none_through_the_engines_check():
    """--no-leakage-gate sets leakage_distance to None; the check must let that pass (its
    declared default is 2, not None) and still refuse a distance out of range."""
    check_options(BalanceParams(leakage_distance=None))
    with pytest.raises(UsageError, match=r"^--leakage-distance must be a whole number in \[0, 8\], got 9$"):
        check_options(BalanceParams(leakage_distance=9))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e20, "8", True])
def test_a_whole_number_option_refuses_what_is_not_one_in_range(value):
    """inf once raised OverflowError (int(inf)) instead of the one-line usage error."""
    with pytest.raises(UsageError, match=r"^--batch-size must be a whole number in \[1, 65536\], got "):
        check_options(TrainConfig(name="m", arch="a", batch_size=value))
