"""The developer's run state between rounds: what a checkpoint holds, typed and versioned.

``checkpoint/checkpoint.pt`` is ``torch.save`` of :meth:`RunState.to_checkpoint` (a plain dict,
so ``weights_only`` loading reads it), replaced atomically after round 0 (when there is one) and
after every round; :meth:`RunState.from_checkpoint` checks its format and experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CHECKPOINT_FORMAT", "CheckpointMismatch", "RunState"]

#: Version of the checkpoint's layout.
CHECKPOINT_FORMAT = 1


class CheckpointMismatch(ValueError):
    """The checkpoint to resume from was written for another experiment (or checkpoint format)."""


@dataclass
class RunState:
    """Everything a run carries from one round to the next.

    ``round``: the last completed round; ``trainer``: :meth:`DeveloperTrainer.state_dict`
    (adapter, head, optimizer, batch-order RNG, permutation, position, step, torch RNG);
    ``signal`` / ``head_signal``: the auditor's signal for the next round (adapter / head
    gradient), or None; ``unlearning_update``: ΔW_s, or None; ``cond``: FairNet's
    :meth:`developer.fairnet.CondStage.state_dict`, else None; ``cond_signal``: its signal;
    ``rows``: every metrics.jsonl line so far; byte and time totals (seconds); ``pending``
    (with ``overlap``): round r's request in flight, ``{"round", "split", "want", "row"}`` (its
    unfinished metrics row); it is sent again on resume.
    """

    fingerprint: str
    round: int
    trainer: dict
    signal: Any = None
    head_signal: Any = None
    unlearning_update: Any = None
    cond: dict | None = None
    cond_signal: Any = None
    rows: list[dict] = field(default_factory=list)
    bytes_to_auditor: int = 0
    bytes_from_auditor: int = 0
    train_time_s: float = 0.0
    channel_time_s: float = 0.0
    wall_time_s: float = 0.0
    pending: dict | None = None

    def to_checkpoint(self) -> dict:
        """The checkpoint's dict: ``{"format": CHECKPOINT_FORMAT, "fingerprint", "round", ...}``."""
        return {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "round": self.round,
                "pending": self.pending, "trainer": self.trainer, "signal": self.signal,
                "head_signal": self.head_signal, "unlearning_update": self.unlearning_update,
                "cond": self.cond, "cond_signal": self.cond_signal, "rows": self.rows,
                "bytes_to_auditor": self.bytes_to_auditor, "bytes_from_auditor": self.bytes_from_auditor,
                "train_time_s": self.train_time_s, "channel_time_s": self.channel_time_s,
                "wall_time_s": self.wall_time_s}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, fingerprint: str, where: str) -> "RunState":
        """The state in a loaded checkpoint, for the experiment ``fingerprint``.

        Raises:
            CheckpointMismatch: another experiment's checkpoint (``where`` names the file), or
                another format, or a checkpoint that lacks a field of this format.
        """
        if ckpt.get("fingerprint") != fingerprint:
            raise CheckpointMismatch(
                f"cannot resume from {where}: it was written for experiment fingerprint "
                f"{str(ckpt.get('fingerprint'))[:12]}, this experiment's fingerprint is "
                f"{fingerprint[:12]} (the [experiment] table differs); start afresh without resume "
                "or use another output folder")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointMismatch(f"checkpoint format {ckpt.get('format')!r} != {CHECKPOINT_FORMAT}")
        required = ("round", "trainer", "signal", "unlearning_update", "cond", "rows", "bytes_to_auditor",
                    "bytes_from_auditor", "train_time_s", "channel_time_s", "wall_time_s")
        missing = [k for k in required if k not in ckpt]
        if missing:
            raise CheckpointMismatch(f"checkpoint {where} lacks {missing}")
        return cls(fingerprint=fingerprint, round=int(ckpt["round"]), trainer=ckpt["trainer"],
                   signal=ckpt["signal"], head_signal=ckpt.get("head_signal"),
                   unlearning_update=ckpt["unlearning_update"], cond=ckpt["cond"],
                   cond_signal=ckpt.get("cond_signal"), rows=list(ckpt["rows"]),
                   bytes_to_auditor=int(ckpt["bytes_to_auditor"]),
                   bytes_from_auditor=int(ckpt["bytes_from_auditor"]),
                   train_time_s=float(ckpt["train_time_s"]), channel_time_s=float(ckpt["channel_time_s"]),
                   wall_time_s=float(ckpt["wall_time_s"]), pending=ckpt.get("pending"))
