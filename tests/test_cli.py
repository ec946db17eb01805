"""The command line: config lookup, summary, clear failures, and every classification config runs."""

import json
from pathlib import Path

import pytest

from ravlt_pl.cli import main, resolve_config
from tests.conftest import tiny_cli_args

CONFIGS = Path(__file__).resolve().parents[1] / "ravlt_pl" / "configs"
CLS_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if "ImageNetDataModule" in p.read_text())


def test_bare_config_names_resolve_against_configs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_config("cls_s.yaml")) == CONFIGS / "cls_s.yaml"
    (tmp_path / "cls_s.yaml").write_text("# a local file wins\n")
    assert resolve_config("cls_s.yaml") == "cls_s.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        resolve_config("nope.yaml")


@pytest.mark.parametrize("config, params", [("cls_t.yaml", 14.90), ("cls_s.yaml", 25.59), ("demo/cls.yaml", None)])
def test_summary_prints_params_and_gflops(config, params, capsys):
    main(["summary", "--config", config])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["input_size"] in ([224, 224], [32, 32]) and result["gflops"] > 0
    if params:
        assert result["params_m"] == params
        assert abs(result["gflops"] - result["published"]["gflops"]) / result["published"]["gflops"] < 0.1


def test_fit_without_imagenet_fails_fast_naming_the_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "cls_s.yaml", "--data.root", str(tmp_path / "imagenet"), "--trainer.devices", "1",
              "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    message = str(exit_info.value.code)
    assert str(tmp_path / "imagenet") in message and "--data.root" in message


@pytest.mark.parametrize("config", CLS_CONFIGS)
def test_every_classification_config_runs_a_step(config, synthetic_cls, tmp_path):
    cli = main(tiny_cli_args(config, synthetic_cls, tmp_path, "--data.init_args.num_classes", "5",
                             "--data.init_args.image_size", "32", "--model.init_args.image_size", "32"))  # fmt: skip
    assert cli.trainer.global_step == 1 and cli.model.hparams.num_classes == 5
