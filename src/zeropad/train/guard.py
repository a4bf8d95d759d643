"""What keeps a run alive, called from the loop: resume, periodic checkpoints, stop signals
(SIGTERM/SIGINT) and non-finite steps. The checkpoint files themselves are zeropad.train.state."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from zeropad.config import Config
from zeropad import storage
from zeropad.errors import ConfigError, Preempted, StorageError, TooManyBadSteps, ZeropadError
from zeropad.parallel import distributed
from zeropad.train.fingerprint import DATA_FILE, check_resume_data
from zeropad.train.state import (Position, checkpoint_root, last_complete_checkpoint, load_checkpoint, prune,
                                 resume_newest, save_checkpoint, step_dirs, supersede_newer)

SECOND_INTERRUPT_EXIT = 130  # 128 + SIGINT, the shell's convention for "killed by Ctrl-C"


class StopSignals:
    """While armed, SIGTERM and SIGINT ask the run to stop after the current optimizer step.
    A second SIGINT exits at once (the last complete checkpoint stays usable: saves are atomic)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()

    def arm(self) -> None:
        # Python only delivers signals to the main thread; elsewhere the caller keeps its own handling.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def disarm(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # os.write, not print: a handler that prints while the interrupted code prints can raise
        # "reentrant call" inside the buffered writer.
        if self.requested is not None and signum == signal.SIGINT:
            os.write(2, b"\nsecond interrupt: exiting now, without a checkpoint\n")
            os._exit(SECOND_INTERRUPT_EXIT)
        self.requested = signal.Signals(signum).name
        os.write(2, f"\n{self.requested}: finishing this step, then saving a checkpoint "
                    "(Ctrl-C again to exit at once)\n".encode())


class RunGuard:
    def __init__(self, cfg: Config, model, optimizer, scheduler, loader, tokenizer, stop: StopSignals, say=print):
        self.cfg, self.output_dir, self.say, self.stop = cfg, Path(cfg.output_dir), say, stop
        self.model, self.optimizer, self.scheduler, self.loader, self.tokenizer = (
            model, optimizer, scheduler, loader, tokenizer)
        self.position = Position()
        self.saved_step: int | None = None
        self.consecutive_bad = 0
        self.data: dict | None = None  # the run's data fingerprint (train/fingerprint.py), saved with each checkpoint
        self.data_note: dict | None = None  # resumed on changed data: the choice, for metrics.jsonl
        # the data position before and after the running (or last) step's packs: the loader itself runs ahead,
        # taken by the worker that prefetches the next step (pack/loader.Prefetch)
        self.step_start = self.step_end = (loader.epoch, loader.index)

    def resume(self) -> int:
        """Restore the state `resume:` asks for; the step the run continues after (0 when fresh).
        metrics.jsonl keeps only the records up to that step, so it reads as one uninterrupted run.

        The data position is packs done, (epoch, index): packs are planned from the data and seed alone,
        so it names the same samples under any world_size x grad_accum, and a run resumed with another
        grouping continues at the same pack. `step` counts optimizer steps whatever their size: the LR
        schedule, train.steps and the checkpoint and eval intervals continue by optimizer steps, each
        taking this run's world_size x grad_accum packs from there on."""
        root, mode = checkpoint_root(self.output_dir), self.cfg.resume
        found = None
        if mode is None:
            if step_dirs(root):
                raise ConfigError(
                    f"resume: {root} holds checkpoints of an earlier run (newest {step_dirs(root)[-1][1].name}); "
                    "set resume=auto to continue it, or choose another output_dir")
        elif mode == "auto":
            found = resume_newest(root, self.model, self.optimizer, self.scheduler, self.say)
            if found is None and step_dirs(root):
                raise ZeropadError(f"resume: no usable checkpoint in {root} (each one's problem is printed above)")
            if found is None:
                self.say(f"resume=auto: no checkpoint in {root} yet; starting fresh")
        else:
            path = Path(mode)
            found = path, load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        if found is None:
            if distributed.is_main():  # rank 0 alone writes metrics.jsonl
                _trim_metrics(self.output_dir / "metrics.jsonl", None)
            return 0
        path, self.position = found
        if self.position.step > self.cfg.train.steps:  # before anything is moved aside or trimmed
            raise ConfigError(f"resume: {path} is at step {self.position.step}, past train.steps="
                              f"{self.cfg.train.steps}; raise train.steps to train on from it, or export it "
                              f"(zeropad export {path} OUT_DIR)")
        if self.data is not None:  # refused here, or the checkpoint.resume_data choice applied to position
            self.data_note = check_resume_data(path, self.data, self.cfg.checkpoint.resume_data, self.position,
                                               self.say)
        self._check_data_position(path)
        changed = _changed_keys(json.loads((path / "config.json").read_text()), json.loads(self.cfg.model_dump_json()))
        if changed:
            self.say(f"resume: config differs from the checkpoint's in {', '.join(changed)}; the optimizer and LR "
                     "schedule state (learning rates included) continue from the checkpoint")
        distributed.barrier()  # every rank has loaded before rank 0 moves anything
        if distributed.is_main():
            supersede_newer(root, self.position.step, self.say)
        self.loader.epoch, self.loader.index = self.position.epoch, self.position.index
        self.step_start = self.step_end = (self.position.epoch, self.position.index)
        # saved already, unless the checkpoint lies in another run's output_dir (resume=PATH): then this run's own
        # first one (at an OOM, a stop, or the end) is written here, where resume=auto finds it
        self.saved_step = self.position.step if path.resolve() == self.checkpoint_path().resolve() else None
        if distributed.is_main():  # rank 0 alone writes metrics.jsonl
            _trim_metrics(self.output_dir / "metrics.jsonl", self.position.step)
        distributed.barrier()
        sp_size = self.cfg.parallel.sp_size
        self.say(f"resumed from {path} at step {self.position.step} "
                 f"(epoch {self.position.epoch}, {self.position.index} packs into it)"
                 f"{_grouping_note(self.position, distributed.world_size(), self.cfg.train.grad_accum, sp_size)}")
        return self.position.step

    def _check_data_position(self, path: Path) -> None:
        """Refuse a data position this run's packs do not have (the pack plan changed: other data,
        pack.max_tokens or train.seed): the loader would silently start the next epoch instead."""
        per_epoch = getattr(self.loader, "packs_per_epoch", None)  # a streaming loader does not know it
        if per_epoch is not None and self.position.index > per_epoch:
            raise ConfigError(
                f"resume: {path} is {self.position.index} packs into epoch {self.position.epoch}, but this run's "
                f"data makes {per_epoch} packs an epoch (the data, pack.max_tokens or train.seed changed), so "
                "its data position does not exist here; resume with the data and packing it was trained with")

    def observe(self, record: dict, skipped: bool) -> None:
        """Count the step; mark it in its metrics record when its update was skipped (step.StepResult.skipped)."""
        self.position.step = record["step"]
        self.position.tokens_seen += record["tokens"]
        if not skipped:
            self.consecutive_bad = 0
            return
        self.consecutive_bad += 1
        self.position.bad_steps += 1
        record.update(skipped_bad_step=True, bad_steps=self.position.bad_steps)
        self.say(f"step {record['step']}: non-finite loss {record['loss']}, aux loss {record.get('aux_loss')} or "
                 f"grad norm {record['grad_norm']}; "
                 f"update skipped ({self.consecutive_bad} in a row, stop at {self.cfg.train.max_bad_steps})")

    def end_step(self, step: int) -> None:
        """Checkpoint when due; after a stop signal or too many bad steps, checkpoint and stop."""
        every = self.cfg.checkpoint.every_steps
        too_many = self.consecutive_bad >= self.cfg.train.max_bad_steps  # the same on every rank (loss is reduced)
        # A signal may reach ranks at different steps: all stop at the step where any rank saw it,
        # or one rank would wait in the checkpoint's collectives while another runs the next step.
        device = next(self.model.parameters()).device
        stop_now = distributed.all_reduce_sum(int(self.stop.requested is not None), device) > 0
        if stop_now and self.stop.requested is None:
            self.stop.requested = "stop requested on another rank"
        if (every and step % every == 0) or stop_now or too_many:
            self.save()
        if too_many:
            raise TooManyBadSteps(
                f"{self.consecutive_bad} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                f"norm, so their updates were skipped; checkpoint (last good weights) saved to "
                f"{self.checkpoint_path()}. "
                "Lower train.lr, check the data, or raise train.max_bad_steps", str(self.checkpoint_path()))
        if stop_now:
            raise Preempted(f"{self.stop.requested} after step {step}: checkpoint saved to {self.checkpoint_path()}",
                            str(self.checkpoint_path()))

    def taking(self, start: tuple[int, int], end: tuple[int, int]) -> None:
        """The step under way took the packs from data position `start` to `end` (pack/loader.StepPacks)."""
        self.step_start, self.step_end = start, end

    def finish(self) -> None:
        """The end-of-run checkpoint; stop signals get their usual meaning back."""
        self.stop.disarm()
        if self.saved_step != self.position.step:
            self.save()

    def save(self, before_step: bool = False) -> None:
        """Checkpoint the state after the last finished step; `before_step`: a step is under way (its packs
        taken from the loader) but has changed no weights, so the data position is the one it started from."""
        if self.saved_step == self.position.step:
            return
        at = self.step_start if before_step else self.step_end
        self.position.epoch, self.position.index = at
        self.position.world_size, self.position.grad_accum = distributed.world_size(), self.cfg.train.grad_accum
        self.position.sp_size = self.cfg.parallel.sp_size
        extra = {DATA_FILE: json.dumps(self.data, indent=2)} if self.data is not None else None
        path = save_checkpoint(self.output_dir, self.position, self.model, self.optimizer, self.scheduler,
                               self.tokenizer, self.cfg.model_dump_json(indent=2), extra)
        if distributed.is_main():
            prune(self.output_dir, self.cfg.checkpoint.keep, self.position.step)
        distributed.barrier()
        self.saved_step = self.position.step
        self.say(f"checkpoint: {path}")

    def checkpoint_path(self) -> Path:
        return checkpoint_root(self.output_dir) / f"step_{self.position.step:06d}"


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring where the run writes and how it was resumed."""
    changed = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        if dotted in ("resume", "output_dir"):
            continue
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            changed += _changed_keys(old[key], new[key], f"{dotted}.")
        elif old.get(key) != new.get(key):
            changed.append(dotted)
    return changed


def _grouping_note(saved: Position, world_size: int, grad_accum: int, sp_size: int) -> str:
    """The resume message's words on a changed grouping ('' when unchanged or unknown). The ranks of a
    sequence-parallel group share each pack, so a step takes world_size / sp_size x grad_accum packs."""
    if saved.world_size is None or saved.grad_accum is None:  # written before zeropad recorded it
        return ""
    if (saved.world_size, saved.grad_accum, saved.sp_size) == (world_size, grad_accum, sp_size):
        return ""
    before = saved.world_size // saved.sp_size * saved.grad_accum
    now = world_size // sp_size * grad_accum
    ranks = lambda n, sp: f"{n} rank(s)" + (f" in SP groups of {sp}" if sp > 1 else "")  # noqa: E731
    grouping = (f"; saved with {ranks(saved.world_size, saved.sp_size)} x grad_accum {saved.grad_accum}, now "
                f"{ranks(world_size, sp_size)} x {grad_accum}")
    if before == now:
        return f"{grouping}: the same {now} packs per optimizer step, so the run continues as it would have"
    return (f"{grouping}: regrouped from {before} to {now} packs per optimizer step; the data continues at the "
            f"same pack, and steps (the LR schedule, train.steps, checkpoint and eval intervals) still count "
            f"optimizer steps, now of {now} packs each")


def _trim_metrics(path: Path, step: int | None) -> None:
    """Drop metrics records after `step` (all of them when None: a fresh run) and any line cut short
    by a crash mid-write; rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    if step is not None:
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp, text = path.with_name(path.name + ".tmp"), "".join(kept)
    with storage.writing("metrics.jsonl, trimmed to the resumed step", path, len(text.encode()), partial=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments, with resume=auto."""
    args = [arg for arg in argv if not arg.startswith("resume=")]
    return shlex.join(["zeropad", *args, "resume=auto"])


@contextmanager
def named_storage_faults(output_dir: str | Path):
    """Around a whole run: a StorageError gains the last complete checkpoint, which `resume=auto` continues
    from; a storage OSError that no write named (ENOSPC, EROFS, EIO, EDQUOT) is named by its file."""
    disk_errors = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT}
    try:
        yield
    except StorageError as err:
        raise _with_checkpoint(str(err), output_dir) from None
    except OSError as err:
        if err.errno not in disk_errors:
            raise
        where = err.filename or output_dir
        raise _with_checkpoint(f"could not write {where}: {storage.why(err, Path(where))}", output_dir) from None


def _with_checkpoint(message: str, output_dir: str | Path) -> StorageError:
    last = last_complete_checkpoint(output_dir)
    if last is None:
        return StorageError(f"{message}. No checkpoint was written yet: the run starts over once the fault is "
                            "fixed", None)
    return StorageError(f"{message}. The last complete checkpoint is {last}: once the fault is fixed, resume=auto "
                        "continues from it", str(last))
