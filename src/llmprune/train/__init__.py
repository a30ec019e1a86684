"""Training pieces every trained job shares (MaskLLM, recovery): one loop on ``accelerate``
(:class:`Trainer`), its packed data stream and its checkpoints. A method contributes a
:class:`~llmprune.train.trainer.TrainTask` (parameters, loss terms, checkpoint tensors); it never
writes a second loop."""

from llmprune.train.trainer import Trainer, TrainerOptions, TrainTask

__all__ = ["TrainTask", "Trainer", "TrainerOptions"]
