"""Find a corpus: explicit file → ``LLMPRUNE_DATA_DIR`` → ``datasets`` from the Hugging Face hub.

A corpus is a list of documents (C4, jsonl files) or of lines (WikiText, plain text), plus
how the seed papers join them before tokenising.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from llmprune import jsonfile
from llmprune.errors import LLMPruneError

# Files under LLMPRUNE_DATA_DIR, in the layout of the public releases.
LOCAL_FILES = {
    ("wikitext2", "train"): ["wikitext-2-raw/wiki.train.raw"],
    ("wikitext2", "validation"): ["wikitext-2-raw/wiki.valid.raw"],
    ("wikitext2", "test"): ["wikitext-2-raw/wiki.test.raw"],
    ("c4", "train"): ["c4/c4-train.00000-of-01024.json.gz", "c4/c4-train.00000-of-01024.json",
                      "c4/c4-train.00000-of-01024.sample.jsonl"],
    ("c4", "validation"): ["c4/c4-validation.00000-of-00008.json.gz",
                           "c4/c4-validation.00000-of-00008.json",
                           "c4/c4-validation.00000-of-00008.sample.jsonl"],
}
NAMES = ("wikitext2", "c4")
# The seed papers evaluate C4 on the first 1100 validation documents.
C4_EVAL_DOCS = 1100


@dataclass
class Corpus:
    """Text pieces plus how to join them; ``kind`` is ``lines`` (WikiText, plain text) or ``docs``."""

    pieces: list[str]
    kind: str
    label: str
    source: str


def data_dir() -> Path | None:
    d = os.environ.get("LLMPRUNE_DATA_DIR")
    return Path(d).expanduser() if d else None


def _wikitext_rows(text: str) -> list[str]:
    # As the HF `wikitext` builder yields them: each line with its newline, blank lines as "".
    return [row if row.strip() else "" for row in text.splitlines(keepends=True)]


def _where(p: Path, lineno: int) -> str:
    return f"{p} line {lineno}"


def _decode(raw: bytes, p: Path, lineno: int) -> str:
    """One line as UTF-8 text, or an error naming the file, the line and the fix."""
    if b"\x00" in raw:
        raise LLMPruneError(f"{_where(p, lineno)}: NUL byte, this looks like a binary file, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        raise LLMPruneError(f"{_where(p, lineno)}: not UTF-8 text (byte 0x{bad}); convert it, "
                            f"e.g. iconv -f latin1 -t utf-8") from None


def _lines(p: Path):
    """``(line number, text)`` of a plain or gzip file, decoded line by line so errors have a place."""
    opener = gzip.open if p.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                    raw = raw[3:]
                yield lineno, _decode(raw, p, lineno)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        if opener is open:
            raise LLMPruneError(f"cannot read data file {p}: {getattr(e, 'strerror', None) or e}") from None
        raise LLMPruneError(f"{_where(p, lineno + 1)}: corrupt or truncated gzip data ({e}); "
                            f"re-download or re-compress the file") from None


def _read_jsonl(p: Path, max_docs: int | None = None) -> list[str]:
    docs = []
    for lineno, line in _lines(p):
        if not line.strip():
            continue
        try:
            row = jsonfile.loads(line)
        except ValueError as e:
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise LLMPruneError(f"{_where(p, lineno)}: not valid JSON ({why}); expected one "
                                f'{{"text": ...}} object per line') from None
        if not isinstance(row, dict):
            raise LLMPruneError(f'{_where(p, lineno)}: expected a JSON object with a "text" field, '
                                f"got a {type(row).__name__}")
        if "text" not in row:
            raise LLMPruneError(f'{_where(p, lineno)}: no "text" field (keys: {", ".join(list(row)[:5])})')
        if not isinstance(row["text"], str):
            raise LLMPruneError(f'{_where(p, lineno)}: "text" must be a string, got '
                                f"{type(row['text']).__name__}")
        docs.append(row["text"])
        if max_docs is not None and len(docs) >= max_docs:
            break
    return docs


def read_file(path: str | Path, max_docs: int | None = None) -> Corpus:
    """A local ``.jsonl`` / ``.json(.gz)`` file of ``{"text": ...}`` documents, or plain text.

    Every line is decoded and checked, so a bad file fails here with its line number, not deep
    inside tokenisation. ``max_docs`` stops a document file early (C4 evaluation reads 1100).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise LLMPruneError(f"data file {p} does not exist")
    if p.name.endswith((".jsonl", ".json", ".json.gz", ".jsonl.gz")):
        docs = _read_jsonl(p, max_docs)
        if not docs:
            raise LLMPruneError(f"data file {p} holds no documents")
        return Corpus(docs, "docs", p.name, str(p))
    # Binary reads keep "\r\n"; translate as text mode (and the old read_text) did.
    text = "".join(line for _, line in _lines(p)).replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise LLMPruneError(f"data file {p} holds no text")
    return Corpus(_wikitext_rows(text), "lines", p.name, str(p))


def local_path(name: str, split: str) -> tuple[Path | None, list[Path]]:
    """The first existing file for ``(name, split)`` under LLMPRUNE_DATA_DIR, and all candidates."""
    d = data_dir()
    cands = [d / rel for rel in LOCAL_FILES[(name, split)]] if d else []
    for c in cands:
        if c.is_file():
            return c, cands
    return None, cands


def _from_hub(name: str, split: str) -> list[str]:
    import datasets

    if name == "wikitext2":
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    else:
        shard = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}[split]
        ds = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
    return list(ds["text"])


def load_corpus(name_or_path: str, split: str) -> Corpus:
    """Resolve a named corpus (``wikitext2``, ``c4``) or a file path; see the module docstring."""
    if name_or_path not in NAMES:
        return read_file(name_or_path)
    if (name_or_path, split) not in LOCAL_FILES:
        raise LLMPruneError(f"{name_or_path} has no {split!r} split")
    path, cands = local_path(name_or_path, split)
    if path is not None:
        corpus = read_file(path, C4_EVAL_DOCS if (name_or_path, split) == ("c4", "validation") else None)
        corpus.label = _label(name_or_path, split, corpus)
        return corpus
    try:
        pieces = _from_hub(name_or_path, split)
    except Exception as e:  # any hub failure becomes one actionable message
        looked = ", ".join(str(c) for c in cands) if cands else "LLMPRUNE_DATA_DIR (not set)"
        hint = (" WikiText-2 train is not available offline: calibrate on c4 (the default) or a "
                "local file (--calib FILE)." if (name_or_path, split) == ("wikitext2", "train") else "")
        raise LLMPruneError(
            f"could not find {name_or_path} {split}: looked in {looked} and on the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:200]}).{hint} Set LLMPRUNE_DATA_DIR to a folder holding "
            f"{' or '.join(LOCAL_FILES[(name_or_path, split)])}, or pass a file path."
        ) from e
    kind = "lines" if name_or_path == "wikitext2" else "docs"
    corpus = Corpus(pieces, kind, "", f"hub:{name_or_path}/{split}")
    corpus.label = _label(name_or_path, split, corpus)
    return corpus


def _label(name: str, split: str, corpus: Corpus) -> str:
    if name == "c4" and split == "validation" and len(corpus.pieces) < C4_EVAL_DOCS:
        return f"c4 ({len(corpus.pieces)}-document validation sample, not the standard 1100)"
    return name if split in ("test", "validation") else f"{name}-{split}"


def check_available(name_or_path: str, split: str) -> None:
    """Fail fast, before the model loads, when a corpus is neither local nor on the hub.

    A corpus that is not on disk is fetched here (``datasets`` caches it for the real use).
    This does not read a local file; to fail on an undecodable file before the model loads,
    call :func:`load_corpus` early instead and keep the :class:`Corpus` for later.
    """
    if name_or_path not in NAMES:
        if not Path(name_or_path).expanduser().is_file():
            raise LLMPruneError(f"data file {name_or_path!r} does not exist (and is not one of {', '.join(NAMES)})")
        return
    if local_path(name_or_path, split)[0] is None:
        load_corpus(name_or_path, split)  # from the hub, or the full "where I looked" message
