"""A personalisation continues the base run's training: its method's options carry over."""
import numpy as np

from models.personalise import personalise
from models.train import TrainConfig, load_model, train
from shared.worlds import render_scene


def test_the_base_runs_method_options_carry_over_to_the_fine_tune(tmp_path):
    train(TrainConfig(method="great", data="synthetic:32", epochs=1, batch_size=8, size=32, width=4,
                      decoder_width=8, max_steps_per_epoch=2, method_options={"aux_norm": "rms", "gal_lr": 3e-4}),
          tmp_path / "base", log=lambda s: None)
    frames = np.stack([render_scene("forest", 3, i, 32)[0] for i in range(12)])
    kw = dict(base_data="synthetic:32", epochs=1, max_steps_per_epoch=1, batch_size=8, log=lambda s: None)
    personalise(tmp_path / "base", frames, tmp_path / "same", method="great", **kw)
    _, ck = load_model(tmp_path / "same")
    assert ck["config"]["method_options"] == {"aux_norm": "rms", "gal_lr": 3e-4}
    # another method does not inherit options that are not its own
    personalise(tmp_path / "base", frames, tmp_path / "other", method="equal", **kw)
    _, ck = load_model(tmp_path / "other")
    assert ck["config"]["method"] == "equal" and ck["config"]["method_options"] == {}
