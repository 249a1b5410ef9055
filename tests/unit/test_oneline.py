"""hpctrain.oneline.OneLineParser: a bad flag is one raised line (the given UserError subclass), with a
did-you-mean hint for an unknown flag that counts flags from groups and mutually exclusive groups too."""
import pytest

from hpctrain.errors import EXIT_USER_ERROR, UserError
from hpctrain.oneline import OneLineParser


class FlagError(UserError):
    pass


def parser(**kwargs) -> OneLineParser:
    p = OneLineParser(prog="prog", **kwargs)
    p.add_argument("--bytes", type=int, default=1)
    group = p.add_argument_group("run")
    group.add_argument("--run-dir", default="runs")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--json", action="store_true")
    either = p.add_mutually_exclusive_group()
    either.add_argument("--entry", choices=["resnet", "bert"], default="resnet")
    return p


@pytest.mark.parametrize("argv, message", [
    (["--bytez", "3"], "unrecognized arguments: --bytez 3 (did you mean --bytes?)"),
    (["--rundir=x"], "unrecognized arguments: --rundir=x (did you mean --run-dir?)"),  # a flag from a group
    (["--jsn", "--entyr"], "unrecognized arguments: --jsn --entyr (did you mean --json, --entry?)"),
    (["--colour"], "unrecognized arguments: --colour (see --help for the options)"),
    (["--bytes", "many"], "argument --bytes: invalid int value: 'many'"),
    (["--entry", "gpt"], "argument --entry: invalid choice: 'gpt' (choose from 'resnet', 'bert')"),
])
def test_a_bad_flag_raises_the_given_error_with_one_line(capsys, argv, message):
    with pytest.raises(FlagError) as caught:
        parser(error_class=FlagError).parse_args(argv)
    assert str(caught.value) == message and "\n" not in message
    assert caught.value.exit_code == EXIT_USER_ERROR
    assert capsys.readouterr() == ("", "")  # no usage block: the entry point prints the line, once


def test_defaults_parse_and_the_default_error_is_user_error():
    p = parser()
    args = p.parse_args(["--run-dir", "r", "--json"])
    assert (args.bytes, args.run_dir, args.json, args.entry) == (1, "r", True, "resnet")
    assert p.flags == ["-h", "--help", "--bytes", "--run-dir", "--json", "--entry"]
    with pytest.raises(UserError, match=r"^argument --bytes: must be > 0$"):
        p.error("argument --bytes: must be > 0")  # a check after parsing goes the same way


def test_help_still_prints_and_exits_0(capsys):
    with pytest.raises(SystemExit) as caught:
        parser().parse_args(["--help"])
    assert caught.value.code == 0 and "--run-dir" in capsys.readouterr().out


def test_the_error_class_must_be_a_user_error():
    with pytest.raises(TypeError, match="subclass of hpctrain.errors.UserError"):
        OneLineParser(error_class=ValueError)
