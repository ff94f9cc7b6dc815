"""Tracker against real MLflow: the embedded sqlite store, a live `mlflow server`, and a server killed mid-run."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distributed import free_port
from mlflow_server import MlflowServer
from pipeline.train.tracking import Tracker

LOGGER = "pipeline.train.tracking"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    yield srv
    srv.stop()


def make_tracker(run_dir: Path, uri: str | None, **kwargs) -> Tracker:
    params = {"model.d_model": 64, "optim.lr": 3e-4, "data.note": "x" * 7000, **{f"sweep.p{i}": i for i in range(150)}}
    return Tracker(run_dir, uri=uri, experiment="test-tracking", run_name=run_dir.name,
                   params=kwargs.pop("params", params), **kwargs)


def log_steps(tracker: Tracker, steps: range, pause: float = 0.0) -> float:
    """Language loss on even steps, teacher loss on odd ones; returns the slowest log() call in seconds."""
    slowest = 0.0
    for step in steps:
        key = "loss/language" if step % 2 == 0 else "loss/teacher"
        start = time.perf_counter()
        tracker.log(step, {key: 1.0 / (step + 1)})
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(pause)
    return slowest


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_default_sqlite_store_and_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, None)
    assert tracker.tracking_uri == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    tracker.log(0, {"train/grad_norm": float("nan"), "train/lr": 1e-3})
    log_steps(tracker, range(20))
    assert tracker.close()

    run_id = tracker.run_id
    client = MlflowClient(tracker.tracking_uri)
    assert steps_of(client, run_id, "loss/language") == list(range(0, 20, 2))
    assert steps_of(client, run_id, "loss/teacher") == list(range(1, 20, 2))
    assert steps_of(client, run_id, "train/grad_norm") == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["mlflow.runName"] == "run"
    assert len(run.data.params) == 153 and run.data.params["sweep.p149"] == "149"
    assert run.data.params["optim.lr"] == "0.0003" and len(run.data.params["data.note"]) == 6000
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == {
        "run_id": run_id, "tracking_uri": tracker.tracking_uri, "experiment": "test-tracking",
        "experiment_id": client.get_run(run_id).info.experiment_id}
    records = jsonl(run_dir)
    assert len(records) == 21 and records[0]["train/grad_norm"] is None and records[0]["train/lr"] == 1e-3
    assert [r["step"] for r in records[1:]] == list(range(20))

    # A resumed job: same run, back to RUNNING; a changed param would be refused by MLflow if it were re-logged.
    resumed = make_tracker(run_dir, None, params={"optim.lr": 1.0})
    wait_for(lambda: resumed.run_id is not None)
    assert resumed.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"
    log_steps(resumed, range(20, 30))
    assert resumed.close()
    assert steps_of(client, run_id, "loss/language") == list(range(0, 30, 2))
    assert steps_of(client, run_id, "loss/teacher") == list(range(1, 30, 2))
    assert client.get_run(run_id).data.params["optim.lr"] == "0.0003"
    assert len(jsonl(run_dir)) == 31


def test_server(server, tmp_path):
    tracker = make_tracker(tmp_path / "run", server.uri)
    log_steps(tracker, range(20))
    assert tracker.close()
    client = MlflowClient(server.uri)
    assert steps_of(client, tracker.run_id, "loss/language") == list(range(0, 20, 2))
    assert steps_of(client, tracker.run_id, "loss/teacher") == list(range(1, 20, 2))
    assert client.get_run(tracker.run_id).data.params["model.d_model"] == "64"


def test_server_killed_mid_run(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = MlflowClient(server.uri)
    tracker = make_tracker(tmp_path / "survivor", server.uri)
    doomed = make_tracker(tmp_path / "doomed", server.uri)
    log_steps(tracker, range(6))
    log_steps(doomed, range(6))
    wait_for(lambda: tracker.run_id and len(steps_of(client, tracker.run_id, "loss/teacher")) == 3)
    wait_for(lambda: doomed.run_id is not None)

    server.stop(signal.SIGKILL)
    slowest = log_steps(tracker, range(6, 40), pause=0.02)
    log_steps(doomed, range(6, 10))
    assert slowest < 0.05

    start = time.monotonic()
    assert doomed.close(timeout=2) is False
    assert time.monotonic() - start < 7
    assert len(jsonl(tmp_path / "doomed")) == 10
    assert any("only in" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

    server.start()
    assert tracker.close(timeout=60)
    assert steps_of(client, tracker.run_id, "loss/language") == list(range(0, 40, 2))
    assert steps_of(client, tracker.run_id, "loss/teacher") == list(range(1, 40, 2))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum(" unreachable (" in m for m in messages) == 2  # one per tracker, not one per failed attempt
    assert sum("reachable again" in m for m in messages) == 1


def test_unreachable_server_never_blocks(tmp_path, caplog):
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, f"http://127.0.0.1:{free_port()}", queue_size=4)
    slowest = log_steps(tracker, range(10), pause=0.05)
    start = time.monotonic()
    assert tracker.close(timeout=1) is False
    assert time.monotonic() - start < 6 and slowest < 0.05
    assert tracker.run_id is None and len(jsonl(run_dir)) == 10
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert sum(" unreachable (" in m for m in warnings) == 1
    assert sum("backlog is full" in m for m in warnings) == 1
    assert "10 of 10 metric points" in warnings[-1]


def test_a_resumed_job_sends_what_an_earlier_job_never_delivered(server, tmp_path):
    """The first job's server was down: it created no run and delivered nothing. The job that resumes from
    its checkpoint at step 5 sends steps 0-5 from metrics.jsonl (6-9 were trained again), each once."""
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, f"http://127.0.0.1:{free_port()}")
    log_steps(first, range(10))
    assert first.close(timeout=1) is False and first.run_id is None
    second = make_tracker(run_dir, server.uri, resume_step=5)
    log_steps(second, range(6, 12))
    assert second.close()
    client = MlflowClient(server.uri)
    assert steps_of(client, second.run_id, "loss/language") == list(range(0, 12, 2))
    assert steps_of(client, second.run_id, "loss/teacher") == list(range(1, 12, 2))
    assert [row["step"] for row in jsonl(run_dir)] == list(range(12))
