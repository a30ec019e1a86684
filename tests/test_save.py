"""Safe output directories: refused targets, one run per output, umask, leftovers of killed runs."""

import json
import os
import subprocess
import sys

import pytest

from llmprune.errors import LLMPruneError
from llmprune.export.save import (
    REPORT_FILE,
    atomic_dir,
    check_output_dir,
    clean_stale_temps,
    output_lock,
    save_pruned,
    update_report,
)


def dead_pid() -> int:
    """The id of a process that has already exited (and been reaped)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def previous_output(d):
    d.mkdir(parents=True)
    (d / REPORT_FILE).write_text("{}")
    (d / "model.safetensors").write_text("old")
    return d


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder as the cwd, holding an input model and an unrelated file."""
    proj = tmp_path / "proj"
    (proj / "model").mkdir(parents=True)
    (proj / "model" / "config.json").write_text("{}")
    (proj / "notes.txt").write_text("mine")
    monkeypatch.chdir(proj)
    return proj


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("out,msg", [
    (".", "is the current directory"),
    ("..", "a parent of the current directory"),
    ("model", "is the input"),
    ("model/sub", "inside the input"),
    ("notes.txt", "is not a directory"),
])
def test_refused_outputs(project, out, msg, overwrite):
    with pytest.raises(LLMPruneError, match=msg):
        check_output_dir(out, overwrite, inputs=["model"])
    with pytest.raises(LLMPruneError, match=msg), atomic_dir(out, overwrite, inputs=["model"]):
        pass
    assert (project / "notes.txt").read_text() == "mine" and (project / "model" / "config.json").is_file()


def test_parent_of_an_input_refused(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    with pytest.raises(LLMPruneError, match="contains the input"):
        check_output_dir(tmp_path / "models", True, inputs=[tmp_path / "models" / "m"])
    # a hub id or a bundled name is no local path: no constraint from it
    check_output_dir(tmp_path / "new", False, inputs=["org/model", "smollm2-135m"])


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_non_empty_dir_refused(tmp_path, overwrite):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_text("meow")
    with pytest.raises(LLMPruneError, match="llmprune did not write"):
        check_output_dir(d, overwrite)
    assert (d / "cat.jpg").read_text() == "meow"


def test_previous_output_needs_overwrite_then_is_replaced(tmp_path):
    out = previous_output(tmp_path / "out")
    with pytest.raises(LLMPruneError, match="--overwrite"):
        check_output_dir(out, False)
    check_output_dir(out, True)
    check_output_dir(tmp_path / "empty-or-new", False)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / REPORT_FILE).write_text('{"new": 1}')
    assert json.loads((out / REPORT_FILE).read_text()) == {"new": 1}
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dir left


def test_unwritable_ancestor_refused(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    asked = []

    def access(path, mode):  # chmod would not stop root, who runs some CI
        asked.append(path)
        return False

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(LLMPruneError, match="ro is not a writable directory"):
        check_output_dir(ro / "a" / "b", False)
    assert asked == [ro]  # the nearest existing ancestor
    assert not (ro / "a").exists()  # checking creates nothing


def test_rules_enforced_again_at_the_rename(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LLMPruneError, match="llmprune did not write"), atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("new")
        out.mkdir()  # someone puts their files there while we save
        (out / "theirs.txt").write_text("keep")
    assert (out / "theirs.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_pruned_over_previous_output_and_report_update(tmp_path):
    from conftest import tiny_model

    out = previous_output(tmp_path / "out")
    model = tiny_model("llama", layers=1, hidden=32, inter=64)
    save_pruned(model, None, out, {"ppl": None}, overwrite=True)
    assert (out / "config.json").is_file() and json.loads((out / REPORT_FILE).read_text()) == {"ppl": None}
    update_report(out, {"ppl": 12.5})
    assert json.loads((out / REPORT_FILE).read_text()) == {"ppl": 12.5}
    save_pruned(None, None, out, {"ppl": 13.0})  # report only
    assert json.loads((out / REPORT_FILE).read_text()) == {"ppl": 13.0}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(LLMPruneError, match="no pruning.json"):
        update_report(tmp_path, {})


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_output_dir_honours_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("ready", flush=True)
sys.stdin.read()
"""


def test_lock_refuses_a_second_run(tmp_path):
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".out.lock")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        with pytest.raises(LLMPruneError, match=f"pid {other.pid}.*is writing"), output_lock(out):
            pass
        # the save itself takes the lock too
        with pytest.raises(LLMPruneError, match="is writing"), output_lock(out):
            pass
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    assert (tmp_path / ".out.lock").exists()  # the other run's lock file: not ours to delete
    with output_lock(out) as lock:  # free once the other run ended
        assert lock.took_over_pid == other.pid


def test_lock_of_a_dead_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    pid = dead_pid()
    (tmp_path / ".out.lock").write_text(f"{pid}\n")
    with output_lock(out) as lock:
        assert lock.took_over_pid == pid
        assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
        with output_lock(out) as inner:  # nested in the same run: shared, not refused
            assert inner is lock
        assert (tmp_path / ".out.lock").exists()
    assert f"from pid {pid}" in capsys.readouterr().err
    assert not (tmp_path / ".out.lock").exists()


def test_lock_creates_and_removes_missing_parents(tmp_path):
    out = tmp_path / "runs" / "exp1" / "out"
    with output_lock(out):
        assert (tmp_path / "runs" / "exp1" / ".out.lock").exists()
    assert not (tmp_path / "runs").exists()


def test_stale_temps_of_dead_runs_cleaned(tmp_path, capsys):
    out = tmp_path / "out"
    dead = dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-abc"
    live = tmp_path / f".out.tmp-{os.getpid()}-xyz"
    other_out = tmp_path / f".other.tmp-{dead}-abc"
    old = tmp_path / f".out.old-{dead}-q"
    for d in (stale, live, other_out, old):
        d.mkdir()
        (d / "model.safetensors").write_text("partial")
    (tmp_path / f".out.tmp-{dead}-file").write_text("not a dir")
    with output_lock(out) as lock:
        assert lock.cleaned == [stale]
    err = capsys.readouterr().err
    assert str(stale) in err and "killed run" in err
    assert "only copy" in err  # the previous output, mid-replacement, is kept while out is missing
    assert not stale.exists() and live.exists() and other_out.exists() and old.exists()
    assert (tmp_path / f".out.tmp-{dead}-file").exists()
    out.mkdir()
    assert clean_stale_temps(out) == [old]  # once out exists again, the old copy goes


def test_killed_save_leaves_temp_that_the_next_run_cleans(tmp_path):
    code = ("import os, sys\nfrom llmprune.export.save import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'model.safetensors').write_text('partial')\n"
            "    print(tmp, flush=True)\n    os._exit(9)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, timeout=120)
    left = tmp_path / os.path.basename(res.stdout.strip())
    assert res.returncode == 9 and left.is_dir() and left.name.startswith(".out.tmp-")
    with output_lock(tmp_path / "out") as lock:
        assert lock.cleaned == [left]
