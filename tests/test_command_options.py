"""Our subcommands' parser: jsonargparse's, split from LightningCLI's options, errors in one line."""

import pytest

from ravlt_pl.command_options import OneLineErrorParser
from ravlt_pl.export import parse_args


def test_split_known_keeps_our_options_with_their_values_and_passes_the_rest_on():
    parser = OneLineErrorParser(prog="p")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--input-size", type=int, nargs=2, default=(224, 224))
    argv = ["--model.init_args.num_classes", "3", "--atol", "-1e-3", "--input-size", "64", "96",
            "--trainer.precision=32-true", "--atol=2"]  # fmt: skip
    assert parser.split_known(argv) == (
        ["--atol", "-1e-3", "--input-size", "64", "96", "--atol=2"],
        ["--model.init_args.num_classes", "3", "--trainer.precision=32-true"],
    )


def test_export_options_are_typed_and_print_config_round_trips_through_options(tmp_path, capsys):
    args, rest = parse_args(["--config", "cls_t.yaml", "--format", "pt2", "--out", "m.pt2", "--input-size", "64",
                             "96", "--model.init_args.num_classes", "3"])  # fmt: skip
    assert args.input_size == (64, 96) and args.atol == 1e-4 and not args.static and args.ckpt is None
    assert rest == ["--model.init_args.num_classes", "3"]
    with pytest.raises(SystemExit):
        parse_args(["--config", "cls_t.yaml", "--format", "onnx", "--out", "m.onnx", "--static", "--print_config"])
    (tmp_path / "export.yaml").write_text(capsys.readouterr().out)
    again, _ = parse_args(["--options", str(tmp_path / "export.yaml")])
    assert (again.config, again.format, again.out, again.static, again.input_size) == (
        "cls_t.yaml", "onnx", "m.onnx", True, (224, 224)
    )  # fmt: skip
