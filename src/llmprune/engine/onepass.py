"""True-sequential pruning of one decoder layer in a single forward pass.

The exact mode (:mod:`llmprune.engine.sequential`) runs every calibration row through the
*dense* layer to gather statistics, prunes, then runs the rows again through the *pruned*
layer: two forwards. Here each batch of rows runs through the layer in a worker thread, and a
forward pre-hook on every linear stops it there until every batch has reached that linear; the
last batch to arrive prunes the linear (its statistics are complete), then all of them go on
through the pruned weights. So o_proj sees the already pruned q/k/v, down_proj the pruned
gate/up (SparseGPT's and llm-compressor's ``true_sequential``), and the same forward's outputs
feed the next layer: one forward plus the statistics and solves.

Only one worker runs at a time: they pass a turn round in index order (a relay), so the
compute is the exact mode's batch loop, cut at the linears, with no oversubscribed cores. The
price is memory: every batch's activations at the current linear are alive together (about one
layer's intermediate activations for all calibration rows, instead of one batch's).

Every batch must reach the same linears in the same order. A layer that routes tokens (MoE
experts) cannot promise that; the engine runs such layers in the exact mode.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from llmprune.engine.capture import layer_output
from llmprune.engine.stats import LayerStats


class _Aborted(Exception):
    """Raised in a waiting worker after another one failed."""


class _Relay:
    """Workers that take turns, one running at a time, in index order 0, 1, …, n−1, 0, …"""

    def __init__(self, n: int) -> None:
        self.n, self.turn = n, 0
        self.cv = threading.Condition()
        self.error: BaseException | None = None

    def wait(self, j: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == j or self.error is not None)
            if self.error is not None:
                raise _Aborted

    def pass_on(self, j: int) -> None:
        with self.cv:
            self.turn = (j + 1) % self.n
            self.cv.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cv:
            if self.error is None:
                self.error = error
            self.cv.notify_all()


def _join_all(workers: list[threading.Thread]) -> None:
    """Wait for every worker, also through a second Ctrl-C. A worker left running inside torch
    while the interpreter shuts down aborts the process (``terminate called without an active
    exception``); told to stop, each one ends at its next linear."""
    for t in workers:
        while t.is_alive():
            try:
                t.join()
            except KeyboardInterrupt:
                continue


@torch.no_grad()
def prune_in_one_pass(layer: nn.Module, linears: dict[str, nn.Linear], inps: torch.Tensor, kwargs: dict,
                      stats: LayerStats, prune: Callable[[str], None], batch_size: int,
                      each: Callable[[int, torch.Tensor], None] | None = None) -> list[str]:
    """Run every row of ``inps`` through ``layer`` once, pruning each linear of ``linears`` as
    soon as every row has reached it (``prune(name)``, with ``stats`` complete for its input);
    the outputs replace ``inps`` in place — or, with ``each``, go to ``each(first row, outputs)``
    and ``inps`` stays as it was. Returns the linears in the order they were pruned.

    ``stats`` must have been created before this call: its hooks accumulate a batch's input
    before that batch stops at the linear.
    """
    starts = list(range(0, inps.shape[0], batch_size))
    relay, local = _Relay(len(starts)), threading.local()
    order: list[str] = []  # the linears in the order the first batch reached them

    def mismatch(j: int, what: str) -> RuntimeError:
        return RuntimeError(f"calibration batch {j} {what} than batch 0 (data-dependent routing?): "
                            "this layer cannot be pruned in one pass; use the exact two-pass mode")

    def stop_at(name: str):
        def hook(_module, _args):
            if relay.error is not None:  # stopping: no more solves, no more compute
                raise _Aborted
            j, k = local.index, local.stops
            local.stops += 1
            if j == 0:
                order.append(name)
            elif k >= len(order) or order[k] != name:
                raise mismatch(j, f"reached {name} at stop {k}, in another order")
            if j == relay.n - 1:  # the last batch is here: the statistics are complete
                prune(name)
            relay.pass_on(j)
            relay.wait(j)
        return hook

    def work(j: int) -> None:
        local.index, local.stops = j, 0
        try:
            relay.wait(j)
            with torch.no_grad():  # grad mode is per thread
                s = starts[j]
                y = layer_output(layer(inps[s : s + batch_size], **kwargs))
                if local.stops != len(order):
                    raise mismatch(j, f"stopped at {local.stops} linears, not {len(order)},")
                if each is not None:
                    each(s, y)
                else:
                    inps[s : s + batch_size] = y  # only this batch's rows, after its own forward
            relay.pass_on(j)
        except _Aborted:
            pass
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread below
            relay.fail(e)

    handles = [lin.register_forward_pre_hook(stop_at(name)) for name, lin in linears.items()]
    try:
        workers = [threading.Thread(target=work, args=(j,), name=f"llmprune-batch-{j}", daemon=True)
                   for j in range(len(starts))]
        try:  # a Ctrl-C may come while the first workers already run and the rest start
            for t in workers:
                t.start()
            for t in workers:
                t.join()
        except BaseException as e:  # e.g. Ctrl-C in the caller: stop the workers, then go on
            relay.fail(e)
            _join_all([t for t in workers if t.ident is not None])
            raise
    finally:
        for h in handles:
            h.remove()
    if relay.error is not None:
        raise relay.error
    return order
