import json

import pytest
import torch

from dynprune.checkpoint import load_checkpoint, model_from_checkpoint
from dynprune.data import load_dataset
from dynprune.model import build_detector
from dynprune.train.engine import TrainConfig, Trainer, fitness
from dynprune.train.gate import default_gate_epochs
from tests.conftest import tiny_config


def _cfg(out, epochs):
    return TrainConfig(epochs=epochs, batch=8, imgsz=64, lr=3e-3, workers=0, out=str(out), warmup_epochs=0.5,
                       mosaic=0.0)


@torch.no_grad()
def _loss_on(model, records, imgsz=64):
    """Mean detection loss over ``records`` without augmentation."""
    from dynprune.data.dataset import DetectionDataset, collate
    from dynprune.loss import DetectionLoss

    model.eval()
    images, targets, _ = collate([DetectionDataset(records, imgsz)[i] for i in range(len(records))])
    images = images.to(next(model.parameters()).device)  # the trainer may have moved it to a GPU
    boxes, logits = model(images)
    points, strides = model.anchors((imgsz, imgsz), images.device, boxes.dtype)
    return float(DetectionLoss(1)(boxes, logits, targets, points, strides)[0].mean())


def test_short_training_lowers_the_loss(synthetic_yaml, tmp_path):
    spec = load_dataset(synthetic_yaml)
    torch.manual_seed(0)
    model = build_detector(tiny_config())
    spec.train = spec.train[:8]
    before = _loss_on(model, spec.train)
    cfg = _cfg(tmp_path / "run", 20)
    cfg.batch, cfg.augment, cfg.lr, cfg.val_every = 4, False, 1e-2, 100
    trainer = Trainer(model, spec, cfg, log=lambda *_: None)
    trainer.fit()
    after = _loss_on(trainer.model, spec.train)
    assert after < 0.8 * before
    for name in ("last.pt", "best.pt"):
        model, ckpt = model_from_checkpoint(str(tmp_path / "run" / name))
        assert ckpt["names"] == ["ring"] and ckpt["imgsz"] == 64
    assert not list((tmp_path / "run").glob(".*"))  # no temporary files left behind


def test_resume_continues_from_the_saved_epoch(synthetic_yaml, tmp_path):
    spec = load_dataset(synthetic_yaml)
    quiet = lambda *_: None  # noqa: E731
    # A run of 3 epochs, "killed" after 2: train 2 epochs with epochs=3 by stopping early.
    torch.manual_seed(0)
    t = Trainer(build_detector(tiny_config()), spec, _cfg(tmp_path / "a", 3), log=quiet)
    t.cfg.epochs = 2
    t.fit()
    assert load_checkpoint(tmp_path / "a" / "last.pt")["epoch"] == 1
    resumed = Trainer(build_detector(tiny_config()), spec, _cfg(tmp_path / "a", 3), log=quiet)
    resumed.resume(str(tmp_path / "a" / "last.pt"))
    assert resumed.start_epoch == 2
    hist = resumed.fit()["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    # results.jsonl: one line an epoch across the interruption, validated epochs with their AP
    lines = [json.loads(line) for line in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all("ap50_95" in r and "best" in r and r["eligible"] for r in lines)
    # best.pt's epoch is the one of best fitness, and the resumed run found it across the interruption
    best = max(lines, key=fitness)
    assert [r["epoch"] for r in lines if r["best"]][-1] == best["epoch"]
    assert load_checkpoint(tmp_path / "a" / "best.pt")["epoch"] == best["epoch"] - 1
    # The resumed run equals an uninterrupted one.
    torch.manual_seed(0)
    full = Trainer(build_detector(tiny_config()), spec, _cfg(tmp_path / "b", 3), log=quiet)
    full.fit()
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_a_short_runs_ema_ends_close_to_its_raw_weights(synthetic_yaml, tmp_path):
    """The saved weights of a short run are an average of its last steps: their distance to the raw
    weights is small against how far training moved them."""
    import copy

    spec = load_dataset(synthetic_yaml)
    torch.manual_seed(0)
    model = build_detector(tiny_config())
    init = copy.deepcopy(model.state_dict())
    t = Trainer(model, spec, _cfg(tmp_path, 6), log=lambda *_: None)
    assert t.ema.window == pytest.approx(10.0)  # 18 steps: the 10-step floor
    t.fit()
    raw = t.model.state_dict()
    names = [k for k, _ in t.model.named_parameters()]

    def dist(a, b):
        return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in names) ** 0.5

    assert dist(t.ema.ema.state_dict(), raw) < 0.35 * dist(raw, init)


@pytest.mark.parametrize("steps", [300, 600, 3000])
def test_the_ema_follows_weights_that_keep_moving_to_the_end(steps):
    """A weight that moves steadily through a run of a few hundred steps (a small dataset's whole
    run): the run's EMA ends within a few percent of the move from it, where a YOLOv5-style window
    (decay 0.9998, tau = steps / 15) stops following after about a third of the run."""
    from dynprune.train.ema import ModelEMA

    w = torch.nn.Linear(1, 1, bias=False)
    w.weight.data.zero_()
    fitted = ModelEMA.for_run(w, steps)
    frozen = ModelEMA(w, decay=0.9998, tau=max(20.0, steps / 15))
    for n in range(1, steps + 1):
        w.weight.data.fill_(n / steps)  # from 0 to 1, as far at the end as at the start
        fitted.update(w)
        frozen.update(w)
    assert 1.0 - float(fitted.ema.weight) < 0.06
    assert 1.0 - float(frozen.ema.weight) > 0.5


def test_ema_window_follows_the_run_length():
    from dynprune.train.ema import EMA_WINDOW_FRACTION, ModelEMA

    m = build_detector(tiny_config())
    assert ModelEMA.for_run(m, 600).window == pytest.approx(600 * EMA_WINDOW_FRACTION)
    assert ModelEMA.for_run(m, 50).window == pytest.approx(10.0)
    assert ModelEMA.for_run(m, 10**7).window == pytest.approx(10000.0)


def test_best_pt_is_chosen_by_the_mean_of_ap50_and_ap50_95():
    # a noisy epoch with the best AP50-95 but an AP50 far below its neighbours' does not win
    steady, noisy = {"ap50": 0.68, "ap50_95": 0.27}, {"ap50": 0.62, "ap50_95": 0.29}
    assert fitness(steady) > fitness(noisy)
    assert fitness({"ap50": 0.5, "ap50_95": 0.3}) == pytest.approx(0.4)


@pytest.mark.parametrize("images, epochs", [(1000, 20), (160, 20), (120, 27), (80, 40), (1, 3200)])
def test_gate_epochs_grow_on_small_datasets(images, epochs):
    assert default_gate_epochs(images) == epochs
