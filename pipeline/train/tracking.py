"""Rank-0 experiment tracking: MLflow fed by a background thread, with run_dir/metrics.jsonl as the full record.

`Tracker.log` only appends a line to metrics.jsonl and puts the points on a queue. A daemon thread owns the
MLflow client: it creates or resumes the run and delivers the points in batches. When the tracking server is
down or slow it keeps a bounded backlog and retries with capped backoff, so training never waits on MLflow.

A job that resumes from a checkpoint trains the steps after it again. metrics.jsonl is cut back to the
checkpoint's step (rewritten atomically) so that it holds every step once; MLflow keeps every point it is
sent and cannot forget one, so the steps it already holds for this run are not sent again (with exact
resume their values are the ones it has).

Files (the resolved config at start, metrics.jsonl at the end) travel the same way, after the points queued
before them. The experiment is created in MLflow's model-training view, with its artifacts beside a SQLite
store (`run_info`); MLflow's system-metrics monitor (CPU, memory, GPU with nvidia-ml-py) samples the host.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.train.run_info import EXPERIMENT_KIND, artifact_location, create_local_store, system_monitor

log = logging.getLogger(__name__)

Point = tuple[str, float, int, int]  # key, value, timestamp (ms), step: the field order of mlflow's Metric
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_CALL = 100
MAX_PARAM_CHARS = 6000
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
LOCAL_STORE = "mlflow.db"  # the store in run_dir when no tracking server is given
STEP_KEY = "train/lr"  # logged at every step: its last step in MLflow is the last step MLflow holds
SYSTEM_METRICS_INTERVAL = 10.0  # seconds between samples of MLflow's system-metrics monitor (MLflow's default)


@dataclass(frozen=True)
class _Artifact:
    path: Path
    folder: str | None  # artifact sub-folder; None: the run's root


@dataclass(frozen=True)
class _Close:
    status: str
    deadline: float  # time.monotonic() after which the worker gives up


class Tracker:
    """Logs metrics from the training loop without ever blocking it; see the module docstring."""

    def __init__(self, run_dir: str | Path, *, uri: str | None, experiment: str, run_name: str | None,
                 params: Mapping[str, Any], resume_step: int | None = None, queue_size: int = 100_000,
                 tags: Mapping[str, str] | None = None, artifacts: Sequence[str | Path] = (),
                 system_metrics: bool = False) -> None:
        """`resume_step`: the checkpoint step a resumed job continues from; records past it are dropped.
        `tags` are set on the run (again by a resumed job); `artifacts` are files uploaded at start."""
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.run_dir / LOCAL_STORE}"
        # MLflow's HTTP client retries a failed request for minutes and waits 120 s for an answer by default:
        # one attempt would then hold the backlog (and close()) hostage. The worker retries on its own schedule.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        history = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            cut_history(history, resume_step)
        earlier = history.stat().st_size if resume_step and history.exists() else 0  # what earlier jobs logged
        self._jsonl = open(history, "a", encoding="utf-8")
        self._queue: queue.SimpleQueue[list[Point] | _Close] = queue.SimpleQueue()
        self._logged = 0  # finite points put on the queue; written by the caller's thread only
        self._result: bool | None = None
        self._worker = _Worker(self._queue, self.run_dir, self._uri, experiment, run_name, params, queue_size,
                               earlier, dict(tags or {}), system_metrics)
        for path in artifacts:
            self.log_artifact(path)
        self._thread = threading.Thread(target=self._worker.run, name="mlflow-tracker", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        return self._worker.run_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        now = time.time()
        values = {key: float(value) for key, value in metrics.items()}
        step = int(step)
        record = {"step": step, "time": round(now, 3)}
        record.update({key: value if math.isfinite(value) else None for key, value in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        points = [(key, value, int(now * 1000), step) for key, value in values.items() if math.isfinite(value)]
        if points:
            self._queue.put(points)
            self._logged += len(points)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Upload the file at `path` (as it is when the worker gets to it) to the run, in the background."""
        self._queue.put(_Artifact(Path(path), folder))

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> bool:
        """Deliver what is queued (metrics.jsonl last), mark the run `status`; False if MLflow missed points."""
        if self._result is not None:
            return self._result
        self.log_artifact(self._jsonl.name)
        self._queue.put(_Close(status, time.monotonic() + timeout))
        self._thread.join(timeout + 1.0)  # the worker stops at the deadline; a request still in flight then fails
        with contextlib.suppress(OSError):
            self._jsonl.close()
        missing = self._logged + self._worker.backfilled - self._worker.delivered
        self._result = self._worker.finished and missing == 0
        if not self._result:
            unset = "" if self._worker.finished else "; the run status was not set"
            log.warning("MLflow at %s did not get everything: %d of %d metric points are only in %s%s",
                        self._uri, missing, self._logged, self._jsonl.name, unset)
        return self._result


class _Worker:
    """Everything the background thread owns: the client, the run, the backlog and the retry state. The
    main thread only reads `run_id`, `delivered` and `finished`, each written here alone."""

    def __init__(self, inbox: queue.SimpleQueue, run_dir: Path, uri: str, experiment: str, run_name: str | None,
                 params: Mapping[str, Any], capacity: int, earlier_bytes: int, tags: dict[str, str],
                 system_metrics: bool) -> None:
        self._inbox, self._uri, self._experiment, self._run_name = inbox, uri, experiment, run_name
        self._earlier_bytes = earlier_bytes  # metrics.jsonl's head, written by earlier jobs of this run
        self._params = {str(key): str(value)[:MAX_PARAM_CHARS] for key, value in params.items()}
        self._run_file = run_dir / "mlflow_run.json"
        self._tags, self._system_metrics, self._monitor = tags, system_metrics, None
        self._artifacts: deque[_Artifact] = deque()
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.delivered = 0
        self.backfilled = 0  # points of earlier jobs, from metrics.jsonl, that MLflow did not have
        self.finished = False
        self._client: Any = None
        self._ready = False
        self._params_pending = False
        self._backlog: deque[Point] = deque(maxlen=capacity)
        self._dropped = 0
        self._refused: set[str] = set()
        self._outage = False
        self._held_through = -1  # a resumed run's last step already in MLflow: not sent again

    def run(self) -> None:
        close: _Close | None = None
        delay = 0.0
        while True:
            if close is None:
                close = self._receive(None if self._ready and not self._backlog else 0.0)
            try:
                self._setup()
                self._flush()
                self._upload()
                self._recovered()
                if close is not None:
                    self._stop_monitor()
                    self._client.set_terminated(self.run_id, close.status)
                    self.finished = True
                    return
                delay = 0.0
            except Exception as exc:
                self._failed(exc)
                delay = min(max(2 * delay, BACKOFF_FIRST), BACKOFF_MAX)
                if close is None:
                    close = self._back_off(delay)
                elif (left := close.deadline - time.monotonic()) > 0:
                    time.sleep(min(delay, left))
                else:
                    self._stop_monitor()
                    if self._artifacts:
                        log.warning("MLflow at %s did not get the files %s", self._uri,
                                    ", ".join(str(a.path) for a in self._artifacts))
                    return

    def _receive(self, timeout: float | None) -> _Close | None:
        """Move queued points into the backlog, waiting up to `timeout` s (None: forever) for the first."""
        try:
            item = self._inbox.get(timeout=timeout)
            while not isinstance(item, _Close):
                if isinstance(item, _Artifact):
                    self._artifacts.append(item)
                else:
                    self._enqueue(item)
                item = self._inbox.get_nowait()
            return item
        except queue.Empty:
            return None

    def _back_off(self, seconds: float) -> _Close | None:
        """Wait `seconds` while still taking in points; return early if close() is called."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if (close := self._receive(left)) is not None:
                return close
        return None

    def _enqueue(self, points: list[Point]) -> None:
        overflow = len(self._backlog) + len(points) - self._backlog.maxlen
        self._backlog.extend(points)  # a full deque drops from the left: the oldest points go first
        if overflow > 0:
            if not self._dropped:
                log.warning("MLflow backlog is full (%d points): dropping the oldest ones, which stay only in "
                            "metrics.jsonl", self._backlog.maxlen)
            self._dropped += overflow

    def _setup(self) -> None:
        if self._ready:
            return
        from mlflow.tracking import MlflowClient

        if self._client is None:
            local = self._run_file.parent / LOCAL_STORE
            if self._uri == f"sqlite:///{local}":
                create_local_store(local)
            self._client = MlflowClient(self._uri)
        if self.run_id is None:
            resumed = self._resume()
            self.run_id = resumed or self._create_run()
            if resumed:
                history = self._client.get_metric_history(resumed, STEP_KEY)
                self._held_through = max((m.step for m in history), default=-1)
            self._backfill()
        if self._params_pending:
            self._log_params()
            self._params_pending = False
            saved = {"run_id": self.run_id, "tracking_uri": self._uri, "experiment": self._experiment,
                     "experiment_id": self.experiment_id}
            tmp = self._run_file.with_suffix(".tmp")  # written last: its presence means the run is fully set up
            tmp.write_text(json.dumps(saved))
            os.replace(tmp, self._run_file)
        self._start_monitor()
        self._ready = True

    def _resume(self) -> str | None:
        """The run saved by an earlier job on this run_dir, set RUNNING again; None when there is none here."""
        from mlflow.exceptions import MlflowException

        if not self._run_file.exists():
            return None
        run_id = json.loads(self._run_file.read_text())["run_id"]
        try:
            self._client.update_run(run_id, status="RUNNING")
            self.experiment_id = self._client.get_run(run_id).info.experiment_id
            self._log_tags(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("run %s from %s is not at %s: starting a new run", run_id, self._run_file, self._uri)
            return None
        return run_id

    def _backfill(self) -> None:
        """Queue, ahead of this job's points, those of earlier jobs that metrics.jsonl holds and MLflow does
        not: an earlier job died before it delivered them (or before it created the run)."""
        if not self._earlier_bytes:
            return
        with open(self._run_file.parent / "metrics.jsonl", "rb") as jsonl:
            lines = jsonl.read(self._earlier_bytes).decode("utf-8").splitlines()
        points = []
        for record in map(json.loads, lines):
            step = record.pop("step")
            if step > self._held_through:
                stamp = int(record.pop("time") * 1000)
                points += [(key, value, stamp, step) for key, value in record.items() if value is not None]
        if len(points) > (room := self._backlog.maxlen - len(self._backlog)):
            log.warning("MLflow lacks %d metric points of earlier jobs; sending the newest %d (all are in "
                        "metrics.jsonl)", len(points), room)
            points = points[len(points) - room:]
        self._backlog.extendleft(reversed(points))
        self.backfilled += len(points)

    def _create_run(self) -> str:
        experiment = self._client.get_experiment_by_name(self._experiment)
        if experiment is None:
            self.experiment_id = self._client.create_experiment(
                self._experiment, artifact_location=artifact_location(self._uri), tags=EXPERIMENT_KIND)
        else:
            self.experiment_id = experiment.experiment_id
            for key, value in EXPERIMENT_KIND.items():
                if key not in experiment.tags:
                    self._client.set_experiment_tag(self.experiment_id, key, value)
        run = self._client.create_run(self.experiment_id, run_name=self._run_name)  # also sets tag mlflow.runName
        self._log_tags(run.info.run_id)
        self._params_pending = True
        return run.info.run_id

    def _log_tags(self, run_id: str) -> None:
        from mlflow.entities import RunTag

        if self._tags:
            self._client.log_batch(run_id, tags=[RunTag(key, value) for key, value in self._tags.items()])

    def _upload(self) -> None:
        """Upload the queued files in order; a file leaves the queue once MLflow has it (or it is gone)."""
        while self._artifacts:
            item = self._artifacts[0]
            if item.path.is_file():
                self._client.log_artifact(self.run_id, str(item.path), item.folder)
            else:
                log.warning("%s is gone: not uploaded to MLflow", item.path)
            self._artifacts.popleft()

    def _start_monitor(self) -> None:
        if self._system_metrics and self._monitor is None:
            self._monitor = system_monitor(self.run_id, self._uri, SYSTEM_METRICS_INTERVAL)
            self._system_metrics = self._monitor is not None

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in self._params.items()]
        for start in range(0, len(params), MAX_PARAMS_PER_CALL):
            self._client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_PER_CALL])

    def _flush(self) -> None:
        """Deliver the backlog in order; a batch leaves it only once MLflow has taken it."""
        while self._backlog:
            batch = list(itertools.islice(self._backlog, MAX_METRICS_PER_CALL))
            held = sum(point[3] <= self._held_through for point in batch)
            points = [point for point in batch if point[0] not in self._refused and point[3] > self._held_through]
            delivered = held + (self._send(points) if points else 0)
            for _ in batch:
                self._backlog.popleft()
            self.delivered += delivered

    def _send(self, points: list[Point]) -> int:
        """log_batch `points` and return how many MLflow took: a key it rejects (an invalid name) is split off
        and skipped from then on, so that it cannot hold back the other series."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        try:
            self._client.log_batch(self.run_id, metrics=[Metric(*point) for point in points])
            return len(points)
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            keys = list(dict.fromkeys(point[0] for point in points))
            if len(keys) > 1:
                return sum(self._send([point for point in points if point[0] == key]) for key in keys)
            self._refused.add(keys[0])
            log.warning("MLflow refused metric %r (%s); it is kept in metrics.jsonl only", keys[0], _brief(exc))
            return 0

    def _failed(self, exc: Exception) -> None:
        if not self._outage:
            log.warning("tracking server at %s unreachable (%s); training continues, metrics are kept in "
                        "metrics.jsonl and retried in the background", self._uri, _brief(exc))
        self._outage = True

    def _recovered(self) -> None:
        if self._outage:
            log.info("tracking server at %s reachable again; the backlog has been delivered", self._uri)
        self._outage = False


def cut_history(path: Path, step: int) -> None:
    """Drop the records of `path` (metrics.jsonl) past `step`, and a last line cut short by a crash, by
    rewriting it atomically; the file is left alone when there is nothing to drop."""
    if not path.exists():
        return
    kept, dropped = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            record_step = None  # a line cut short
        if record_step is not None and record_step <= step:
            kept.append(line)
        else:
            dropped.append(record_step)
    if not dropped:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    steps = [d for d in dropped if d is not None]
    log.info("%s: dropped %d records past step %d (steps %s trained again after resuming)", path, len(dropped), step,
             f"{min(steps)}-{max(steps)}" if steps else "none")


def _brief(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"
