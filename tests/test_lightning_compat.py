"""The installed Lightning still has every private attribute ravlt_pl uses (one test each), and a missing one is named."""

import lightning
import pytest
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ravlt_pl import lightning_compat
from ravlt_pl.lightning_compat import PRIVATE_ATTRIBUTES, LightningCompatError, private


@pytest.fixture(scope="module")
def instances() -> dict[type, object]:
    """A real object of each owner (attributes set in ``__init__`` exist on instances only)."""
    from lightning.pytorch.cli import LightningCLI

    trainer = Trainer(logger=False, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
    return {
        Trainer: trainer,
        ModelCheckpoint: ModelCheckpoint(),
        LightningModule: LightningModule(),
        LightningCLI: LightningCLI,
    }


@pytest.mark.parametrize("owner, path", PRIVATE_ATTRIBUTES, ids=[f"{o.__name__}.{p}" for o, p in PRIVATE_ATTRIBUTES])
def test_the_installed_lightning_has(owner, path, instances):
    try:
        private(instances[owner], path)
    except LightningCompatError as err:
        pytest.fail(str(err))


def test_a_missing_attribute_is_named_with_the_lightning_version(instances):
    with pytest.raises(
        LightningCompatError, match=rf"Lightning {lightning.__version__}: Trainer\.fit_loop\.gone_counter is gone"
    ):
        private(instances[Trainer], "fit_loop.gone_counter.current")


def test_no_private_lightning_access_outside_the_adapter():
    """Every ``._name`` of a trainer, loop or Lightning object in the package goes through lightning_compat."""
    import re
    from pathlib import Path

    package = Path(lightning_compat.__file__).parent
    pattern = re.compile(r"\b(trainer|fit_loop|self)\._(signal_connector|checkpoint_connector|accelerator_connector|get|trainer)\b"
                         r"|\.fit_loop\.|\.kth_value =")  # fmt: skip
    offenders = [f"{p.relative_to(package)}:{n}" for p in package.rglob("*.py") if p.name != "lightning_compat.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert not offenders, offenders
