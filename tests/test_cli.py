"""The command line: config lookup, summary, clear failures, and every classification config runs."""

import dataclasses
import json
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import yaml

import ravlt_pl
from ravlt_pl.cli import main, resolve_config
from tests.conftest import TINY, tiny_cli_args

PACKAGE = Path(ravlt_pl.__file__).resolve().parent
CONFIGS = Path(__file__).resolve().parents[1] / "ravlt_pl" / "configs"
CLS_CONFIGS = sorted(
    p.relative_to(CONFIGS).as_posix()
    for p in CONFIGS.rglob("*.yaml")
    if "ravlt_pl.data.imagenet." in p.read_text() and "finetune" not in p.parts
)  # finetune: tests/tasks/test_finetune.py


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


def test_help_lists_every_subcommand_as_python_m_ravlt_pl(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m ravlt_pl ") and "__main__" not in out
    assert all(f"\n  {name} " in out for name in ("summary", "benchmark", "analyze-rank", "export"))
    assert all(name in out for name in ("fit", "validate", "test", "predict"))


def test_missing_config_name_lists_the_nearest_once(tmp_path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parents[1])  # the clone: ./configs links to the package's
    with pytest.raises(FileNotFoundError) as info:
        resolve_config("det/maskrcn_s_1x.yaml")
    message = str(info.value)
    assert "did you mean det/maskrcnn_s_1x.yaml" in message and message.count("configs") == 1


def test_yaml_key_typo_says_did_you_mean_first(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    label_smothing: 0.1\ntrainr:\n  max_epochs: 1\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "demo/cls.yaml", "--config", str(typo)])
    first = capsys.readouterr().err.splitlines()[0]
    assert first == ("error: model (ravlt_pl.tasks.classification.ClassificationTask): unknown option "
                     "'label_smothing'; did you mean 'label_smoothing'?")  # fmt: skip
    typo.write_text("trainr:\n  max_epochs: 1\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "demo/cls.yaml", "--config", str(typo)])
    assert "did you mean 'trainer.max_epochs'" in capsys.readouterr().err.splitlines()[0]


DEFAULT_CALLBACKS = ["ravlt_pl.lightning_cli.BestCheckpoint", "ravlt_pl.callbacks.LastCheckpoint",
                     "lightning.pytorch.callbacks.lr_monitor.LearningRateMonitor", "ravlt_pl.callbacks.FaultTolerance",
                     "ravlt_pl.lightning_cli.RequireTrainingBatches"]  # fmt: skip


def test_print_config_shows_the_callbacks_that_run(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "demo/cls.yaml", "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/loss",
              "--print_config"])  # fmt: skip
    config = yaml.safe_load(capsys.readouterr().out)
    shown = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert shown == DEFAULT_CALLBACKS + ["lightning.pytorch.callbacks.EarlyStopping"]


def test_a_yaml_callbacks_list_is_added_to_ours(synthetic_cls, tmp_path):
    extra = tmp_path / "callbacks.yaml"
    extra.write_text("trainer:\n  callbacks:\n  - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
                     "    init_args: {monitor: val/loss}\n")  # fmt: skip
    cli = main(tiny_cli_args("demo/cls.yaml", synthetic_cls, tmp_path, "--config", str(extra)))
    running = {f"{type(c).__module__}.{type(c).__qualname__}" for c in cli.trainer.callbacks}
    assert {*DEFAULT_CALLBACKS, "lightning.pytorch.callbacks.early_stopping.EarlyStopping"} <= running


def test_demo_runs_without_warnings_from_our_code(tmp_path, monkeypatch):
    from ravlt_pl import demo
    from ravlt_pl.data.synthetic import make_classification

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["demo", "classification"])  # as `python -m ravlt_pl.demo classification` has it
    small = partial(make_classification, train_per_class=4, val_per_class=3, image_size=32)
    monkeypatch.setitem(demo.DEMOS, "classification", dataclasses.replace(demo.DEMOS["classification"], make=small))
    tiny = json.dumps({k: v for k, v in TINY.items() if k not in ("layerscales", "layer_init_values")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = demo.run("classification", ["--model.init_args.backbone_overrides", tiny, "--trainer.max_epochs", "1",
                                           "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"])  # fmt: skip
    assert data["headline"]["value"] >= 0
    ours = [str(w.message) for w in caught if raised_in_our_package(w.filename) or "LightningCLI" in str(w.message)
            or "multiple `ModelCheckpoint`" in str(w.message)]  # fmt: skip
    assert not ours


def raised_in_our_package(filename: str) -> bool:
    """A warning from a file of the ravlt_pl package itself (not from a venv inside a clone named ravlt_pl)."""
    return Path(filename).resolve().is_relative_to(PACKAGE)


def test_warnings_filter_tells_our_package_from_a_venv_in_a_clone_named_ravlt_pl():
    clone = PACKAGE.parent
    assert raised_in_our_package(str(PACKAGE / "cli.py"))
    assert not raised_in_our_package(str(clone / ".venv/lib/python3.11/site-packages/lightning/pytorch/trainer.py"))
    assert not raised_in_our_package(str(clone / "ravlt_pl_notes" / "x.py"))


def test_every_published_config_states_gpu_precision_and_cudnn_autotuning():
    """TF32 for float32 matmuls everywhere; cuDNN autotuning where input sizes are fixed (not detection)."""
    import yaml

    published = [p for p in CONFIGS.rglob("*.yaml") if "demo" not in p.parts and "finetune" not in p.parts]
    assert len(published) == 4 + 14 + 7
    for path in published + sorted(CONFIGS.glob("finetune/*.yaml")):  # the fine-tune recipes follow the same rule
        config = yaml.safe_load(path.read_text())
        assert config["model"]["init_args"]["float32_matmul_precision"] == "high", path
        detection = "det" in path.parts or "DetectionTask" in config["model"]["class_path"]
        assert config["trainer"]["benchmark"] is not detection, path


def test_summary_prints_only_its_json(tmp_path):
    import subprocess

    run = subprocess.run([sys.executable, "-m", "ravlt_pl", "summary", "--config", "demo/cls.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert len(run.stdout.splitlines()) == 1 and json.loads(run.stdout)["model"] == "ClassificationTask"


def test_readme_commands_run_the_venv_python():
    """A fresh machine has no torch in its bare ``python``: every command the README gives uses .venv/bin/python
    (the wheel's lines excepted: they run in the environment it was installed into)."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    bare = [line for line in readme.splitlines() if re.search(r"(^|`|srun )python3? (-m |scripts/)", line)
            and "installs as a wheel" not in line and "ravlt_pl.demo classification` then run" not in line]  # fmt: skip
    assert not bare, bare
