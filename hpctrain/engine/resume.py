"""Resume, framework-neutral: which checkpoint (this run's newest good one, or --resume FILE), whether it fits,
and the run directory settled for the run (hpctrain.rundir). Mixed into TrainerBase; rank 0 does the reading,
every rank learns a refusal before the restore's first collective."""
from __future__ import annotations

from pathlib import Path

from hpctrain import rundir, watchdog
from hpctrain.checkpoint import CheckpointError, engine_of
from hpctrain.errors import ExitError, rebuild


class Resuming:
    def resume(self) -> int:
        """Rank 0 reads and checks the checkpoint to resume from; `restore` hands its state to every rank (or,
        found nothing, makes every rank start from rank 0's initial weights)."""
        with watchdog.phase("resume"):
            found, error = None, None
            if self.cluster.rank == 0:
                removed = self.checkpoints.remove_stale_temps()
                if removed:
                    self.log(f"removed {len(removed)} temp file(s) of an interrupted save: {', '.join(removed)}")
                try:
                    found = self.read_checkpoint()
                except ExitError as e:
                    error = (e.exit_code, str(e))
            with watchdog.collective("the checkpoint's verdict"):
                error = self.backend.broadcast_object(error)
            if error:
                raise rebuild(*error)
            self.step = self.restore(found)
            return self.step

    def read_checkpoint(self):
        """(path, state) of the checkpoint to resume from, or None (rank 0 only); then the run directory is
        settled for this run: what it trains again set aside, its run.json written."""
        opened = self.rt.opened or rundir.Opened(None, self.cfg.run.resume)
        record, identity = opened.record, self.job.identity
        if record is not None and identity is not None:
            diff = rundir.difference(identity, record.identity())
            if diff:
                raise rundir.RunDirError(f"run dir {self.cfg.run.run_dir} holds another run ({diff}): "
                                         f"{rundir.ways_out(self.cfg.run.run_dir)}")
        found = None
        if opened.resume == "auto":
            found = self.checkpoints.load_latest(self.read_state)
        elif opened.resume != "never":
            path = Path(opened.resume)
            found = path, self.read_named(path)
        if found is not None:
            self.check_fits(*found, record, explicit=opened.resume not in ("auto", "never"))
        if identity is not None:
            self.settle_run_dir(found, record, opened.resume)
        return found

    def read_named(self, path: Path) -> dict:
        """--resume FILE: a checkpoint of this engine, or one line saying what it is instead."""
        try:
            return self.checkpoints.load(path, self.read_state)
        except CheckpointError:
            raise
        except Exception as e:
            writer, mine = engine_of(path), self.cfg.dist.framework
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hint = (f"it was written by the {writer} engine: add --framework {writer}" if writer and writer != mine
                    else f"{type(e).__name__}: {first}")
            raise CheckpointError(f"run.resume (--resume): {path} is not a checkpoint of the {mine} engine "
                                  f"({hint})") from None

    def check_fits(self, where, state: dict, record, explicit: bool) -> None:
        """The checkpoint belongs to this run (or, named by --resume, may start or rewind it) and matches the
        model: its identity, then every tensor's name and shape. One line naming the first difference."""
        theirs = state.get("run_id")
        if record is not None and theirs and theirs != record.run_id:
            began = (record.started_from or {}).get("run_id")
            if not explicit or theirs != began:
                raise rundir.RunDirError(f"checkpoint {where} belongs to run {theirs}, but run dir "
                                         f"{self.cfg.run.run_dir} holds {record.describe()}: "
                                         f"{rundir.ways_out(self.cfg.run.run_dir)}")
        identity = self.job.identity
        diff = rundir.difference(identity, state["identity"]) if identity and state.get("identity") else None
        problem = f"it has {diff}" if diff else self.shape_mismatch(state)
        if problem:
            raise CheckpointError(f"checkpoint {where} does not fit this model: {problem}")

    def settle_run_dir(self, found, record, mode: str) -> None:
        """Set aside what a run resumed at its step trains again; write run.json for a new run (or note this
        Slurm job in it, so a requeue of the job resumes the run whatever its --resume says); start the status."""
        run_dir, step = self.cfg.run.run_dir, int(found[1]["step"]) if found else 0
        aside, names, records = rundir.set_aside_redone(run_dir, step)
        if aside is not None:
            self.log(f"run dir: moved what this run trains again after step {step} to {aside} ({len(names)} "
                     f"checkpoint(s){': ' + ', '.join(names) if names else ''}; {records} metrics record(s))")
        c = self.cluster
        if record is None:
            began = None
            if found and mode not in ("auto", "never"):
                began = {"path": str(found[0]), "run_id": found[1].get("run_id"), "step": step}
            record = rundir.new_record(self.job.identity, c.job_id, began)
            rundir.write_record(run_dir, record)
            self.log(f"run dir {run_dir}: {'new ' if not found else ''}{record.describe()}")
        elif c.job_id and record.slurm_job != c.job_id:
            record.slurm_job = c.job_id
            rundir.write_record(run_dir, record)
        self.run_id = record.run_id
        rundir.keep_status(run_dir)
        rundir.update_status(state="running", step=step, resumed_at=step, exit_code=None, reason=None,
                             checkpoint=found[0].name if found else None, checkpoint_step=step if found else None,
                             launch={"job": c.job_id, "restart": c.restart_count, "step_id": c.step_id,
                                     "ranks": c.size, "nodes": c.num_nodes, "launcher": c.launcher})
