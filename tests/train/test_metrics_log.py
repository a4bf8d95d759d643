"""metrics.jsonl and TensorBoard tell the same story: after a resume or a fresh run into the same output_dir,
and when a run stops before its end."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from zeropad.train.guard import _trim_metrics
from zeropad.train.metrics import MetricsLogger


def _tb_losses(out) -> list[tuple[int, float]]:
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("loss")]


def test_tensorboard_drops_the_steps_metrics_jsonl_drops(tmp_path):
    """Resumed at step 2, steps 3-4 logged again replace the earlier run's (they were shown twice); a fresh run into
    the same directory replaces everything."""
    first = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 5):
        first.log({"step": step, "loss": 10.0 + step})
    first.close()
    _trim_metrics(tmp_path / "metrics.jsonl", 2)  # what guard.resume does
    resumed = MetricsLogger(tmp_path, tensorboard=True, start=2)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 1.0 + step})
    resumed.close()
    logged = [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert _tb_losses(tmp_path) == logged == [(1, 11.0), (2, 12.0), (3, 4.0), (4, 5.0)]
    fresh = MetricsLogger(tmp_path, tensorboard=True, start=0)
    fresh.log({"step": 1, "loss": 99.0})
    fresh.close()
    assert _tb_losses(tmp_path) == [(1, 99.0)]


def test_tensorboard_has_every_step_before_the_log_is_closed(tmp_path):
    """A run stopped by a signal, bad steps or an OOM exits without close(): each step is flushed as it is logged
    (the writer's own flush comes every 2 minutes, so a stopped run lost its recent steps, a short one all)."""
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 4):
        log.log({"step": step, "loss": float(step)})
    assert _tb_losses(tmp_path) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    log.close()
