"""Save a pruned model as a plain HF directory, safely.

- :func:`check_output_dir` refuses an ``out`` that would destroy something (the cwd, an input,
  a foreign directory) before any heavy work; :func:`atomic_dir` checks again at the rename.
- :func:`output_lock` keeps two runs off the same ``out`` and cleans temp dirs left by killed runs.
- :func:`atomic_dir` writes a temp dir beside ``out`` and renames it into place; the result honours
  the umask, and nothing but its own temp dir (or the llmprune output it replaces) is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmprune import jsonfile
from llmprune.errors import LLMPruneError, is_no_space

REPORT_FILE = "pruning.json"
RECIPE_FILE = "recipe.yaml"
ALLOCATION_PLOT = "allocation.png"


def _resolve(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def _local_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The inputs that are local files or dirs (hub ids and bundled names are not)."""
    return [_resolve(p) for p in inputs if p and Path(p).expanduser().exists()]


def current_umask() -> int:
    """The process umask (read from /proc where possible: ``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def report_kind(report: dict) -> str:
    """The job kind a ``pruning.json`` records (reports written before kinds were recorded:
    structured ones by their method, the rest are one-shot ``prune`` outputs)."""
    kind = report.get("kind")
    if isinstance(kind, str):
        return kind
    return "structured" if report.get("method") in ("osscar", "depth") else "prune"


def output_kind(out: Path) -> str:
    """The kind of the llmprune output in directory ``out`` (its ``pruning.json``), or an error
    when that file cannot be read as one: such a directory is not known to be ours."""
    try:
        report = jsonfile.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LLMPruneError(f"--out {out} has a {REPORT_FILE} llmprune cannot read ({type(e).__name__}); it is "
                            "never replaced. Give another --out") from None
    if not isinstance(report, dict):
        raise LLMPruneError(f"--out {out} has a {REPORT_FILE} that is not a llmprune report; it is never "
                            "replaced. Give another --out")
    return report_kind(report)


def _check_not_an_input(out: Path, inputs: Iterable[str | Path], flag: str) -> None:
    """``out`` may be neither an input, nor inside one, nor (when it would be replaced whole) hold one."""
    for inp in _local_inputs(inputs):
        if out == inp or out.is_relative_to(inp):
            raise LLMPruneError(f"{flag} {out} is {'the input' if out == inp else 'inside the input'} {inp}; "
                                f"saving there would replace it. Give a path outside it")
        if inp.is_relative_to(out):
            raise LLMPruneError(f"{flag} {out} contains the input {inp}; saving there would delete it. "
                                f"Give a new directory")


def _check_writable_parent(out: Path, flag: str) -> None:
    anc = out.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise LLMPruneError(f"cannot write {flag} {out}: {anc} is not a writable directory")


def check_output_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                     kind: str | None = None) -> None:
    """Refuse an ``out`` that saving there would harm; cheap, so call it before heavy work.

    Refused always: the current directory or one of its parents, a parent of an input, an input
    itself or a dir inside one, an existing non-directory, a non-empty directory that is not a
    previous llmprune output (no readable ``pruning.json``), an output of another ``kind`` than
    the one being written (``None``: any llmprune output), an ``out`` whose nearest existing
    ancestor is not writable. Without ``overwrite`` also any non-empty directory.
    """
    out = _resolve(out)
    cwd = Path.cwd().resolve()
    if out == cwd or cwd.is_relative_to(out):
        what = "the current directory" if out == cwd else f"a parent of the current directory {cwd}"
        raise LLMPruneError(f"--out {out} is {what}; saving there would replace it. "
                            f"Give a new directory, e.g. --out {cwd / 'pruned'}")
    _check_not_an_input(out, inputs, "--out")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise LLMPruneError(f"--out {out} exists and is not a directory; give a directory path")
        if any(out.iterdir()):
            if not (out / REPORT_FILE).is_file():
                raise LLMPruneError(f"--out {out} is a non-empty directory that llmprune did not write "
                                    f"(no {REPORT_FILE}); it is never replaced, even with --overwrite. "
                                    f"Give a new or empty directory")
            theirs = output_kind(out)
            if kind is not None and theirs != kind:
                raise LLMPruneError(f"--out {out} holds a llmprune output of kind {theirs!r}; a {kind!r} output "
                                    "never replaces it, even with --overwrite. Give another --out")
            if not overwrite:
                raise LLMPruneError(f"--out {out} holds a previous llmprune output; pass --overwrite "
                                    f"to replace it, or choose another --out")
    _check_writable_parent(out, "--out")


def json_of_kind(kind: str) -> Callable[[Path], bool]:
    """A test for :func:`check_output_file`: ``path`` holds a JSON object llmprune wrote for ``kind``."""
    def ours(path: Path) -> bool:
        try:
            data = jsonfile.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("kind") == kind and "llmprune" in data.get("versions", {})
    return ours


def check_output_file(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (), *,
                      flag: str = "--out", what: str = "a file", ours: Callable[[Path], bool]) -> Path:
    """The guard of :func:`check_output_dir` for a single output file (a mask file, a JSON report).

    Refused always: a directory, an input or a path inside one, an existing file that ``ours``
    does not recognise as one llmprune wrote of this kind, an unwritable place. An existing file
    of this kind is replaced only with ``overwrite``. Checked before any heavy work; nothing is
    written here.
    """
    out = _resolve(path)
    if out.is_dir():
        raise LLMPruneError(f"{flag} {out} is a directory; give a file path")
    _check_not_an_input(out, inputs, flag)
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_file() or not ours(out):
            raise LLMPruneError(f"{flag} {out} exists and is not {what} llmprune wrote; it is never replaced, "
                                f"even with --overwrite. Give a new file name")
        if not overwrite:
            raise LLMPruneError(f"{flag} {out} exists; pass --overwrite to replace it, or give another name")
    if not out.parent.is_dir():
        raise LLMPruneError(f"directory {out.parent} of {flag} {out.name} does not exist")
    _check_writable_parent(out, flag)
    return out


# -- leftovers of killed runs ------------------------------------------------------------------

def _leftover_re(out: Path) -> re.Pattern:
    # .NAME.tmp-PID-XXXX (a save in progress) or .NAME.old-PID-XXXX (the output being replaced)
    return re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[^/]*")


def clean_stale_temps(out: str | Path) -> list[Path]:
    """Remove temp dirs of *this* ``out`` whose writing process is dead; return them.

    A killed save leaves ``.OUT.tmp-PID-*`` (a partial model). ``.OUT.old-PID-*`` (the previous
    output, mid-replacement) is removed only when ``out`` exists again; otherwise it is kept and
    reported on stderr as possibly the only copy. Anything else is never touched.
    """
    out = _resolve(out)
    if not out.parent.is_dir():
        return []
    pattern, removed = _leftover_re(out), []
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir() or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            print(f"llmprune: note: {p} may be the only copy of the previous {out.name} "
                  f"(a run was killed while replacing it); left in place", file=sys.stderr)
            continue
        shutil.rmtree(p)
        removed.append(p)
        print(f"llmprune: note: removed {p}, left by a killed run (pid {m.group(2)})", file=sys.stderr)
    return removed


# -- one run per output -------------------------------------------------------------------------

@dataclass
class OutputLock:
    """A held lock on an output path (see :func:`output_lock`)."""

    out: Path
    path: Path
    took_over_pid: int | None = None
    cleaned: list[Path] = field(default_factory=list)


_held: dict[Path, list] = {}  # lock path -> [fd, depth, OutputLock]: nested holds are free


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _make_parents(d: Path) -> list[Path]:
    """Create the missing dirs up to ``d``; return those created (deepest first)."""
    missing = []
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir()
    return missing


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[OutputLock]:
    """Hold ``.OUT.lock`` beside ``out`` (holding our pid) from validation to the end of the save.

    A second run on the same ``out`` fails at once with ``LLMPruneError``. The lock is an
    ``flock`` on the file, so the kernel releases it when its holder dies even by ``kill -9``;
    a lock file left by a dead pid is taken over (noted on stderr). Nested holds in one process
    share the lock. On acquiring, temp dirs of killed runs on ``out`` are cleaned.
    """
    out = _resolve(out)
    path = _lock_path(out)
    if path in _held:
        _held[path][1] += 1
        try:
            yield _held[path][2]
        finally:
            _held[path][1] -= 1
        return
    created = _make_parents(out.parent)
    try:
        fd, previous = _acquire(path, out)
    except BaseException:
        for d in created:  # only the (empty) dirs we made
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    lock = OutputLock(out, path)
    if previous is not None:
        lock.took_over_pid = previous
        print(f"llmprune: note: took over {path} from pid {previous}, which is no longer running",
              file=sys.stderr)
    _held[path] = [fd, 1, lock]
    try:
        lock.cleaned = clean_stale_temps(out)
        yield lock
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            path.unlink()  # unlink while still holding the flock, so no one locks a dead inode
        os.close(fd)
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()  # fails (and stays) when the output landed inside


def _acquire(path: Path, out: Path) -> tuple[int, int | None]:
    """Open and flock the lock file; return ``(fd, pid of a stale previous holder or None)``."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LLMPruneError(f"cannot create the lock {path} for --out {out}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise LLMPruneError(f"another llmprune run ({who}) is writing {out}; wait for it to "
                                f"finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        # The holder we waited on may have unlinked this file before we locked it: retry on the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read_pid(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd, previous


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


# -- writing ------------------------------------------------------------------------------------

def follow_umask(root: Path) -> None:
    """Give ``root`` and everything below it the modes ``mkdir`` / ``open`` would under the umask:
    ``mkdtemp`` makes 0700 and safetensors writes 0600, unlike every other file we write."""
    mask = current_umask()
    for d, _dirs, names in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for n in names:
            f = os.path.join(d, n)
            if not os.path.islink(f):
                os.chmod(f, 0o666 & ~mask)


def _no_space(out: Path, e: BaseException) -> LLMPruneError:
    return LLMPruneError(f"no space left on the device while writing {out}; nothing was replaced and the "
                         "partial copy was removed. Free some space and run again")


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (),
               kind: str | None = None) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it becomes ``out``, on failure it vanishes.

    The rules of :func:`check_output_dir` (for an output of ``kind``) are enforced before and
    again at the rename. The temp name carries our pid so that a later run can tell a killed
    run's leftovers. A full disk is one line, naming ``out``.
    """
    out = _resolve(out)
    inputs = list(inputs)
    check_output_dir(out, overwrite, inputs, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        try:
            yield tmp
        except Exception as e:
            if is_no_space(e):
                raise _no_space(out, e) from e
            raise
        follow_umask(tmp)
        check_output_dir(out, overwrite, inputs, kind)  # again: the disk may have changed during the save
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, old)  # onto the empty dir we just made
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)  # the previous llmprune output (checked above)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """A file object for ``path`` that replaces it only once complete (temp file + ``os.replace``);
    on failure the temp file goes and ``path`` is untouched. The umask decides the mode."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # 0o666 through os.open: the umask decides the mode, as for a plain open()
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_no_space(e):
            raise _no_space(path, e) from e
        raise


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as JSON atomically."""
    with atomic_file(path) as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")


def update_report(out: str | Path, report: dict) -> Path:
    """Replace ``pruning.json`` of a saved output atomically (e.g. after a later evaluation)."""
    out = _resolve(out)
    if not (out / REPORT_FILE).is_file():
        raise LLMPruneError(f"{out} has no {REPORT_FILE}; save the model there first")
    with output_lock(out):
        write_json(out / REPORT_FILE, report)
    return out / REPORT_FILE


def save_pruned(model, tokenizer, out: str | Path, report: dict, recipe_yaml: str | None = None,
                overwrite: bool = False, extra_files: dict[str, bytes | Callable[[Path], object]] | None = None,
                inputs: Iterable[str | Path] = ()) -> Path:
    """Write safetensors + config + tokenizer + ``pruning.json`` (+ ``recipe.yaml``) to ``out``.

    ``extra_files`` (name → bytes, or a function that writes the given path) land in the same
    atomic write (e.g. the allocation plot, a mask file).
    ``inputs`` (model dir, data files) are paths ``out`` must not touch. With ``model=None`` only
    the report of an existing output is replaced (:func:`update_report`).
    """
    if model is None:
        update_report(out, report)
        return Path(out)
    with output_lock(out), atomic_dir(out, overwrite, inputs, report_kind(report)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe_yaml is not None:
            (tmp / RECIPE_FILE).write_text(recipe_yaml)
        for name, data in (extra_files or {}).items():
            if callable(data):  # a writer, e.g. MaskSet.save
                data(tmp / name)
            else:
                (tmp / name).write_bytes(data)
        write_json(tmp / REPORT_FILE, report)
    return Path(out)
