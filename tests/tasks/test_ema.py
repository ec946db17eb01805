"""The weight EMA: outside the task's modules, one update per optimizer step at the decay derived from the batch."""

import pytest
import torch
from lightning.pytorch import Callback

from ravlt_pl.cli import main
from tests.conftest import tiny_cli_args


class WeightsAtEachStep(Callback):
    """The model's floating-point state after each optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.states):
            self.states.append(
                {k: v.detach().clone() for k, v in pl_module.model.state_dict().items() if v.is_floating_point()}
            )


def test_ema_updates_once_per_optimizer_step_at_the_decay_of_its_batch(synthetic_cls, tmp_path):
    # 4 micro-batches of 2, accumulated by 2: 2 optimizer steps of 4 images; a decay of 0.25 per step
    # is stated per 512 images as 0.25 ** (512 / 4).
    args = tiny_cli_args("demo/cls.yaml", synthetic_cls, tmp_path, "--data.init_args.image_size", "32",
                         "--model.init_args.ema_decay", str(0.25 ** 128), "--trainer.fast_dev_run", "false",
                         "--trainer.accumulate_grad_batches", "2", "--trainer.max_epochs", "1",
                         "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "0",
                         "--trainer.callbacks+=tests.tasks.test_ema.WeightsAtEachStep")  # fmt: skip
    cli = main(args)
    ema = cli.model.ema
    assert "ema" not in dict(cli.model.named_children())  # not a submodule: DDP never wraps it
    assert cli.trainer.global_step == 2 and int(ema.averaged.n_averaged) == 2
    assert ema.step_decay == pytest.approx(0.25)
    first, second = next(c for c in cli.trainer.callbacks if isinstance(c, WeightsAtEachStep)).states
    averaged = ema.module.state_dict()
    for key, value in second.items():
        torch.testing.assert_close(averaged[key], 0.25 * first[key] + 0.75 * value, msg=key)


def test_checkpoint_keeps_the_average_beside_the_weights_and_validate_evaluates_both(synthetic_cls, tmp_path):
    args = tiny_cli_args("demo/cls.yaml", synthetic_cls, tmp_path, "--data.init_args.image_size", "32",
                         "--model.init_args.ema_decay", "0.9")  # fmt: skip
    cli = main(args)
    ckpt = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert int(state["ema.n_averaged"]) == 1
    assert torch.equal(state["ema.module.head.weight"], cli.model.ema.module.head.weight)
    validated = main(["validate", *args[1:], "--trainer.fast_dev_run", "false", "--ckpt_path", str(ckpt)])
    assert torch.equal(validated.model.ema.module.head.weight, state["ema.module.head.weight"])
    assert int(validated.model.ema.averaged.n_averaged) == 1
    assert {"val/top1", "val/ema_top1"} <= set(validated.trainer.callback_metrics)


def test_detection_and_segmentation_evaluate_the_ema_when_set():
    from functools import partial

    from ravlt_pl.models.detection import RAVLTRetinaNet
    from ravlt_pl.tasks.detection import DetectionTask
    from ravlt_pl.tasks.segmentation import SegmentationTask
    from tests.conftest import TINY

    images = torch.rand(1, 3, 64, 64)
    retinanet = partial(RAVLTRetinaNet, variant="ravlt_t", backbone_overrides=TINY, fpn_channels=16, score_thresh=0.0)
    cases = [
        (DetectionTask(retinanet, num_classes=3, ema_decay=0.9), lambda task: task(images)[0]["scores"]),
        (SegmentationTask(num_classes=3, backbone_overrides=TINY, ema_decay=0.9),
         lambda task: task.predict_probs(images, [(64, 64)], [(64, 64)])[0]),
    ]  # fmt: skip
    with torch.no_grad():
        for task, evaluate in cases:
            task.eval()
            task.ema.on_validation_start(None, task)  # where a trainer makes the copy
            for param in task.ema.module.parameters():
                param.add_(0.05 * torch.randn_like(param))  # the average now differs from the model
            with_ema = evaluate(task)
            ema, task.ema = task.ema, None
            assert not torch.equal(evaluate(task), with_ema)  # the model's own weights give another result
            task.model.load_state_dict(ema.module.state_dict())
            assert torch.equal(evaluate(task), with_ema), type(task).__name__  # the EMA's weights give this one
