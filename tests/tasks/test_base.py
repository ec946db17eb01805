"""What every task shares: weight-decay parameter groups from ``weight_decay_exempt``."""

from ravlt_pl.tasks.base import param_groups
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


def test_name_key_exempts_names_containing_it():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, weight_decay_exempt=["norm"])
    decay, no_decay = _names(task, param_groups(task.model, task.weight_decay_exempt))
    assert no_decay == {n for n, _ in task.model.named_parameters() if "norm" in n}
    assert "head.bias" in decay and "layers.0.blocks.0.gamma_1" in decay


def test_empty_exempt_decays_every_parameter():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, weight_decay_exempt=[])
    groups = param_groups(task.model, task.weight_decay_exempt)
    assert len(groups) == 1 and _names(task, groups)[0] == {n for n, _ in task.model.named_parameters()}
