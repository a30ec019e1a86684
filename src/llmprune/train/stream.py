"""Packed training windows: documents tokenised in a seeded order, joined with EOS, cut into
``seqlen`` windows with no padding. The position is small state (document cursor, epoch and
the leftover tokens), so a checkpoint can resume the stream exactly.

Documents (C4, ``.jsonl``) are shuffled per epoch from ``seed``; line corpora (WikiText, plain
text) are one running text, read in order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from llmprune.data.sources import Corpus, check_available, load_corpus
from llmprune.errors import LLMPruneError


@dataclass
class StreamState:
    """Where the stream is: ``epoch``, next document ``cursor`` and tokens not yet windowed."""

    epoch: int = 0
    cursor: int = 0
    buffer: list[int] = field(default_factory=list)
    windows: int = 0  # windows handed out so far (for the log)


CHUNK_CHARS = 20_000


def _chunks(lines: list[str], size: int) -> list[str]:
    out, cur, n = [], [], 0
    for line in lines:
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


class PackedStream:
    """An endless stream of ``(seqlen,)`` token windows from a corpus."""

    def __init__(self, corpus: Corpus, tokenizer, seqlen: int, seed: int = 0,
                 state: StreamState | None = None) -> None:
        self.tokenizer, self.seqlen, self.seed = tokenizer, seqlen, seed
        if corpus.kind == "lines":
            # One running text (WikiText's lines keep their own newlines), tokenised in chunks
            # of whole lines so that the leftover buffer stays small.
            self.docs = _chunks(corpus.pieces, CHUNK_CHARS)
            self.shuffle, self.sep = False, None
        else:
            self.docs = [d for d in corpus.pieces if d.strip()]
            self.shuffle, self.sep = True, tokenizer.eos_token_id
        if not self.docs or not self.docs[0]:
            raise LLMPruneError(f"{corpus.label}: no text to train on")
        self.label = corpus.label
        self.state = state or StreamState()
        self._order: list[int] | None = None
        self._order_epoch = -1

    def _doc_order(self) -> list[int]:
        if self._order_epoch != self.state.epoch:
            order = list(range(len(self.docs)))
            if self.shuffle:
                random.Random(f"{self.seed}:{self.state.epoch}").shuffle(order)
            self._order, self._order_epoch = order, self.state.epoch
        return self._order

    def _fill(self) -> None:
        st = self.state
        read = 0
        while len(st.buffer) < self.seqlen:
            order = self._doc_order()
            ids = self.tokenizer(self.docs[order[st.cursor]], add_special_tokens=False).input_ids
            st.buffer.extend(ids)
            if self.sep is not None:
                st.buffer.append(self.sep)
            st.cursor += 1
            read += 1
            if st.cursor == len(order):
                st.epoch, st.cursor = st.epoch + 1, 0
            if read > 2 * len(self.docs) and not st.buffer:
                raise LLMPruneError(f"{self.label}: the text tokenises to nothing")

    def next_window(self) -> torch.Tensor:
        self._fill()
        st = self.state
        window, st.buffer = st.buffer[: self.seqlen], st.buffer[self.seqlen:]
        st.windows += 1
        return torch.tensor(window, dtype=torch.long)

    def next_batch(self, n: int) -> torch.Tensor:
        """``(n, seqlen)`` consecutive windows."""
        return torch.stack([self.next_window() for _ in range(n)])


def training_stream(train_data: str, tokenizer, seqlen: int, seed: int,
                    corpus: Corpus | None = None) -> tuple[PackedStream, Corpus]:
    """The packed stream a training job reads: ``corpus`` if given (e.g. already read by a
    benchmark), else ``train_data`` (c4 | wikitext2 | a file) read now."""
    if corpus is None:
        check_available(train_data, "train")
        corpus = load_corpus(train_data, "train")
    return PackedStream(corpus, tokenizer, seqlen, seed), corpus
