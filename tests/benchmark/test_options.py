"""The benchmark's options: help with defaults, a YAML ``--config``, ``--print_config``, one-line errors."""

import pytest

from ravlt_pl.benchmark import runner, train_memory


@pytest.mark.parametrize("module", [runner, train_memory])
def test_every_option_has_help_and_shows_its_default(module, monkeypatch):
    parser = module.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "print_config", "config")]
    assert [a.dest for a in options if not a.help] == []
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    text = parser.format_help()
    if module is runner:
        assert {"models", "resolutions", "batch_sizes", "rounds", "out"} <= {a.dest for a in options}
        assert "default: ravlt_s_reference)" in text and "default: reports/benchmark)" in text
        assert "default: 5)" in text


def test_the_command_line_keeps_its_option_names_and_defaults():
    args = runner.parse_args(["--models", "--batch-sizes", "16", "2", "--compile", "--channels-last",
                              "--feed-img-s", "imagenet=1200", "coco=25", "--threads", "2"])  # fmt: skip
    assert args.models == [] and args.batch_sizes == [16, 2] and args.compile == [] and args.channels_last
    assert args.feed_img_s == [("imagenet", 1200.0), ("coco", 25.0)] and args.threads == 2
    defaults = runner.parse_args([])
    assert defaults.compile is None and defaults.train_batch_size == 8 and defaults.resolutions == [224]
    assert str(defaults.out) == "reports/benchmark" and defaults.min_sample_time == 0.2


def test_options_come_from_a_config_file_and_print_config_writes_one(tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text("models: [resnet18]\nbatch_sizes: [4]\nrounds: 2\n")
    args = runner.parse_args(["--config", str(config), "--rounds", "3"])  # later options win
    assert args.models == ["resnet18"] and args.batch_sizes == [4] and args.rounds == 3
    with pytest.raises(SystemExit) as done:
        runner.parse_args(["--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "- resnet18" in printed and "rounds: 2" in printed


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--rounds", "many"], "rounds"),
        (["--device", "gpu"], "device"),
        (["--no-such-option"], "--no-such-option"),
        (["--feed-img-s", "mnist=3"], "--feed-img-s"),
        (["--freezing"], "--freezing"),
        (["--config", "missing.yaml"], "missing.yaml"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(argv, named, capsys):
    with pytest.raises(SystemExit) as done:
        runner.parse_args(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err


def test_train_memory_names_an_unknown_model_in_one_line(capsys):
    with pytest.raises(SystemExit):
        train_memory.main(["--model", "no_such_model", "--batch-size", "1", "--resolution", "32"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model 'no_such_model'" in err, err
