"""Training refuses impossible settings and an unusable output folder before it trains."""

import pytest

from edgesplit.models import train as train_module
from edgesplit.models.train import Recipe, train


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a training loop would start."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the settings were checked")

    monkeypatch.setattr(train_module, "TensorBatches", refuse)


@pytest.mark.parametrize(("recipe", "needle"), [
    (Recipe(epochs=0), "epochs must be at least 1"),
    (Recipe(batch_size=0), "batch size must be at least 1"),
    (Recipe(train_limit=0), "train limit must be at least 1"),
    (Recipe(train_limit=-5), "train limit must be at least 1"),
    (Recipe(max_lr=float("nan")), "learning rate"),
])
def test_impossible_recipes_are_refused(recipe, needle, tmp_path, no_training):
    with pytest.raises(ValueError, match=needle):
        train("resnet_fm", recipe, out_dir=tmp_path, progress=False)


def test_an_output_path_that_is_a_file_is_refused_before_training(tmp_path, no_training):
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub"):
        with pytest.raises(ValueError, match="cannot write weights to"):
            train("resnet_fm", Recipe(epochs=1, train_limit=8), out_dir=out, progress=False)
