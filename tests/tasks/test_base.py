"""What every task shares: weight-decay parameter groups from ``weight_decay_exempt``, the fused optimizer."""

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay

from ravlt_pl.tasks.base import build_optimizer, param_groups
from ravlt_pl.tasks.classification import ClassificationTask
from tests.conftest import TINY


def _names(task, groups) -> list[set[str]]:
    named = {id(p): n for n, p in task.model.named_parameters()}
    return [{named[id(p)] for p in group["params"]} for group in groups]


def test_classification_exempts_biases_and_1d_but_decays_layer_scale_gammas():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY)
    assert task.weight_decay_exempt == ["1d"]  # DeiT's rule by default
    decay_group, no_decay_group = param_groups(task.model, task.weight_decay_exempt)
    decay, no_decay = _names(task, (decay_group, no_decay_group))
    assert no_decay_group["weight_decay"] == 0.0 and "weight_decay" not in decay_group
    assert {"norm.weight", "layers.0.blocks.0.attn.qkvo.bias", "patch_embed.proj.1.weight"} <= no_decay
    assert "layers.0.blocks.0.gamma_1" in decay and "layers.3.blocks.0.gamma_2" in decay  # (1, C, 1, 1)
    params = dict(task.model.named_parameters())
    assert all(params[n].ndim > 1 for n in decay) and all(params[n].ndim <= 1 for n in no_decay)


def _by_param(groups) -> dict[int, tuple[float, bool]]:
    """``id(param) → (lr scale, exempt from weight decay)`` of optimizer groups, ours or timm's."""
    return {id(p): (g.get("lr_scale", 1.0), g.get("weight_decay", None) == 0.0) for g in groups for p in g["params"]}


def test_the_1d_rule_and_layer_decay_form_timms_groups():
    """Our groups are timm's: ``create_optimizer_v2`` (which exempts ``no_weight_decay()`` too) and
    ``param_groups_layer_decay`` on RAVLT's ``group_matcher`` decay and scale each parameter as we do."""
    model = ClassificationTask(num_classes=3, backbone_overrides=TINY).model
    assert model.no_weight_decay() == set()  # the gammas decay, as our "1d" groups and the recipes say
    ours = _by_param(param_groups(model, ["1d"]))
    timm_optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert ours == _by_param(timm_optimizer.param_groups)
    timm_groups = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.7
    )
    assert _by_param(param_groups(model, ["1d"], layer_decay=0.7)) == _by_param(timm_groups)


def test_name_key_exempts_names_containing_it():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, weight_decay_exempt=["norm"])
    decay, no_decay = _names(task, param_groups(task.model, task.weight_decay_exempt))
    assert no_decay == {n for n, _ in task.model.named_parameters() if "norm" in n}
    assert "head.bias" in decay and "layers.0.blocks.0.gamma_1" in decay


def test_norm_layers_exempts_every_normalisation_layer_whatever_its_name():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, weight_decay_exempt=["norm_layers"])
    decay, no_decay = _names(task, param_groups(task.model, task.weight_decay_exempt))
    # The stem's BatchNorms (patch_embed.proj.1/4/7/10) carry no "norm" in their names; LayerNorms do.
    assert {
        "patch_embed.proj.1.weight",
        "patch_embed.proj.10.bias",
        "layers.0.blocks.0.norm1.norm.weight",
        "norm.bias",
    } <= no_decay
    assert "layers.0.blocks.0.attn.qkvo.bias" in decay and "patch_embed.proj.0.bias" in decay  # conv biases decay
    layers = (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)
    assert no_decay == {f"{m}.{n}" for m, mod in task.model.named_modules() if isinstance(mod, layers)
                        for n, _ in mod.named_parameters(recurse=False)}  # fmt: skip


def test_empty_exempt_decays_every_parameter():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, weight_decay_exempt=[])
    groups = param_groups(task.model, task.weight_decay_exempt)
    assert len(groups) == 1 and _names(task, groups)[0] == {n for n, _ in task.model.named_parameters()}


def _factory(spec: dict):
    """The optimizer callable LightningCLI builds from a config's ``optimizer:`` entry."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import OptimizerCallable

    parser = ArgumentParser()
    parser.add_argument("--optimizer", type=OptimizerCallable)
    return parser.instantiate_classes(parser.parse_object({"optimizer": spec})).optimizer


def test_adamw_is_fused_on_cuda_unless_the_config_says_otherwise():
    model = ClassificationTask(num_classes=3, backbone_overrides=TINY).model
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # the choice only; torch's fused AdamW also runs on CPU
    fused = build_optimizer(_factory(adamw), model, ["1d"], cuda)
    assert fused.defaults["fused"] is True and all(group["fused"] for group in fused.param_groups)
    assert [group["weight_decay"] for group in fused.param_groups] == [0.01, 0.0] and fused.defaults["lr"] == 1e-3
    assert build_optimizer(_factory(adamw), model, ["1d"], cpu).defaults["fused"] is None
    chosen = dict(adamw, init_args={"fused": False})
    assert build_optimizer(_factory(chosen), model, ["1d"], cuda).defaults["fused"] is False
    foreach = dict(adamw, init_args={"foreach": True})
    assert build_optimizer(_factory(foreach), model, ["1d"], cuda).defaults["fused"] is None
    sgd = build_optimizer(_factory({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}), model, [], cuda)
    assert sgd.defaults["fused"] is True
    rmsprop = build_optimizer(_factory({"class_path": "torch.optim.RMSprop"}), model, [], cuda)
    assert "fused" not in rmsprop.defaults


def test_float32_matmul_precision_is_set_for_the_process_when_the_task_is_built():
    before = torch.get_float32_matmul_precision()
    try:
        ClassificationTask(num_classes=3, backbone_overrides=TINY, float32_matmul_precision="medium")
        assert torch.get_float32_matmul_precision() == "medium"
        ClassificationTask(num_classes=3, backbone_overrides=TINY)  # None: left as it is
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_every_argument_is_a_hyper_parameter_but_the_optimizer_and_schedule_callables():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, ema_decay=0.9)
    assert task.hparams["num_classes"] == 3 and task.hparams["ema_decay"] == 0.9
    assert task.hparams["weight_decay_exempt"] is None and task.hparams["report_dir"] is None  # defaults, not passed
    assert "optimizer" not in task.hparams and "scheduler" not in task.hparams
