"""Training runs never lose or overwrite work silently: the --out checks, the run lock, orphan temporary files,
SIGINT/SIGTERM, and a SIGKILL in the middle of a checkpoint write followed by --resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaf2n import train as train_cli
from metaf2n.io import read_jsonl
from metaf2n.trainer import FAULT_ENV, LOCK_NAME

TINY = ["--num-feat", "8", "--num-block", "1", "--num-grow-ch", "8", "--masknet-feat", "8", "--d-num-feat", "8",
        "--tasks", "1", "--face-patches", "1", "--background-patches", "1", "--face-patch-size", "32",
        "--face-size", "64", "--background-patch-size", "32", "--background-crop-size", "64", "--val-tasks", "1",
        "--device", "cpu", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "metaf2n.train", *TINY, *args], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_out_holding_other_files_or_another_run_is_refused(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("mine: true\n")
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        train_cli.main([*TINY, "--steps", "1", "--out", str(theirs)])
    assert "holds files that are not a metaf2n run (notes.txt): choose an empty folder, or pass --force" in \
        capsys.readouterr().err
    assert (theirs / "config.yaml").read_text() == "mine: true\n"
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert train_cli.main([*TINY, "--steps", "1", "--out", str(out)]) == 0
    before = (b / "checkpoints" / "latest.pt").read_bytes()
    with pytest.raises(SystemExit):
        train_cli.main([*TINY, "--steps", "2", "--out", str(b), "--resume", str(a / "checkpoints" / "latest.pt")])
    assert "is not a checkpoint of --out" in capsys.readouterr().err
    assert (b / "checkpoints" / "latest.pt").read_bytes() == before


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{os.getppid()}\n")  # a running process: pytest's parent
    with pytest.raises(SystemExit):
        train_cli.main([*TINY, "--steps", "1", "--out", str(out)])
    assert f"is in use by another training run (PID {os.getppid()}" in capsys.readouterr().err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(dead.stdout)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".latest.pt.abc123.tmp").write_bytes(b"\0" * 1000)  # an interrupted write
    assert train_cli.main([*TINY, "--steps", "1", "--out", str(out)]) == 0
    assert "taking over the stale lock" in caplog.text and "removed 1 temporary files" in caplog.text
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert not list((out / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_a_final_checkpoint_and_one_line(tmp_path, sig, code):
    out = tmp_path / "run"
    process = run_cli(["--steps", "100000", "--warmup-steps", "0", "--ckpt-every", "100000", "--val-every",
                       "100000", "--out", str(out)])
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(r.get("phase") == "meta" for r in _records(log)):
        if process.poll() is not None:
            break
        time.sleep(0.1)  # polling for the first meta-step record, bounded by the deadline
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    lines = [line for line in err.splitlines() if line.startswith("stopped")]
    assert len(lines) == 1 and "Traceback" not in err
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    steps = [r["step"] for r in _records(log) if r.get("phase") == "meta"]
    assert state["step"] == steps[-1] >= 1 and f"after meta-step {state['step']}" in lines[0]
    assert (out / "checkpoints" / f"step_{state['step']:08d}.pt").exists()
    assert not (out / LOCK_NAME).exists()


def _records(path: Path) -> list[dict]:
    try:
        return read_jsonl(path)
    except (OSError, ValueError):
        return []


def test_sigkill_during_a_checkpoint_write_then_resume_is_exact(tmp_path):
    args = ["--steps", "4", "--warmup-steps", "2", "--ckpt-every", "2", "--val-every", "2"]
    whole = tmp_path / "whole"
    process = run_cli([*args, "--out", str(whole)])
    assert process.wait(timeout=300) == 0, process.stderr.read()
    killed = tmp_path / "killed"
    process = run_cli([*args, "--out", str(killed)], env={FAULT_ENV: "2"})
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert list((killed / "checkpoints").glob(".*.tmp"))  # the half-written file the kill left
    assert torch.load(killed / "checkpoints" / "latest.pt", weights_only=True)["step"] == 0  # the warm-up's
    process = run_cli([*args, "--out", str(killed), "--resume"])
    assert process.wait(timeout=300) == 0, process.stderr.read()
    expected = torch.load(whole / "checkpoints" / "latest.pt", weights_only=True)
    resumed = torch.load(killed / "checkpoints" / "latest.pt", weights_only=True)
    assert resumed["step"] == expected["step"] == 4
    for name in ("sr", "masknet", "disc"):
        for key, value in expected[name].items():
            assert torch.equal(resumed[name][key], value), f"{name}.{key}"
    records = read_jsonl(killed / "log.jsonl")
    meta = [r["step"] for r in records if r["phase"] == "meta"]
    val = [(r["warmup_step"], r["step"]) for r in records if r["phase"] == "val"]
    warmup = [r["warmup_step"] for r in records if r["phase"] == "warmup"]
    assert meta == [1, 2, 3, 4] and warmup == [1, 2]
    # before and after the warm-up, then every 2 meta-steps: each once, as in the uninterrupted run
    assert val == [(0, 0), (2, 0), (2, 2), (2, 4)]
    assert val == [(r["warmup_step"], r["step"]) for r in read_jsonl(whole / "log.jsonl") if r["phase"] == "val"]
    assert not [p for folder in (killed, killed / "checkpoints") for p in folder.glob(".*.tmp")]
    assert sorted(p.name for p in (killed / "checkpoints").glob("step_*.pt")) == sorted(
        p.name for p in (whole / "checkpoints").glob("step_*.pt"))
