"""The auditor's side of the protocol: evaluate the developer's model on the auditor's own data.

:class:`AuditorService` is transport-free: the Flower ClientApp (:mod:`auditor.clientapp`) and the
co-located reference runner both call :meth:`AuditorService.handle` with a request ``RecordDict``
and send back the ``RecordDict`` it returns. Everything that leaves the auditor passes
:func:`protocol.messages.make_evaluate_reply`, which admits aggregate metrics only.

Order of checks on every request: message type, records/keys/shapes/dtypes/finiteness of the
payload, experiment fingerprint; only then is the auditor's data read (lazily, once per process).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import RecordDict

from protocol.config import AuditorConfig, ExperimentConfig, experiment_fingerprint
from protocol.data import Dataset, load_split
from protocol.messages import (
    EVALUATE,
    make_evaluate_reply,
    parse_evaluate_request,
)
from protocol.metrics import fairness_report
from protocol.model import (
    FairsplitModel,
    adapter_state,
    build_model,
    head_state,
    load_adapter_state,
    resolve_image_size,
    state_spec,
)

__all__ = ["AuditorService", "ProtocolMismatch"]

log = logging.getLogger(__name__)


class ProtocolMismatch(ValueError):
    """The developer's request is for a different experiment or message type than agreed."""


class AuditorService:
    """Answers the developer's requests with aggregate metrics over the auditor's data.

    Args:
        exp: the shared experiment config (the auditor's own copy).
        cfg: the auditor's own config (data with sensitive attributes, ``min_group_size``).

    The model and data are built on first use and cached for the life of the process.
    """

    def __init__(self, exp: ExperimentConfig, cfg: AuditorConfig):
        self.exp = exp
        self.cfg = cfg
        self.fingerprint = experiment_fingerprint(exp)
        self._model: FairsplitModel | None = None
        self._data: dict[str, Dataset] | None = None
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)

    @property
    def model(self) -> FairsplitModel:
        """The shared backbone + LoRA + head (built once)."""
        if self._model is None:
            self._model = build_model(self.exp).to(self.cfg.device)
            self._adapter_spec = state_spec(adapter_state(self._model))
            self._head_spec = state_spec(head_state(self._model))
        return self._model

    @property
    def data(self) -> dict[str, Dataset]:
        """The auditor's parts: auditor_train, auditor_val, auditor_test (with sensitive groups)."""
        if self._data is None:
            cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else None
            self._data = load_split(self.cfg.data, self.exp, "auditor",
                                    resolve_image_size(self.exp.model), cache)
        return self._data

    def handle(self, message_type: str, content: RecordDict) -> RecordDict:
        """Answer one request.

        Args:
            message_type: Flower message type; only ``evaluate`` is served.
            content: the request's records (see :mod:`protocol.messages`).

        Returns:
            The reply's records: ``{"report": ConfigRecord{"json": FairnessReport}}``.

        Raises:
            ProtocolMismatch: unsupported message type or a different experiment fingerprint.
            PayloadError: the request violates the payload contract.
            protocol.metrics.SmallGroupError: an evaluation group is below ``min_group_size``.
        """
        if message_type != EVALUATE:
            raise ProtocolMismatch(f"unsupported message type {message_type!r}")
        model = self.model
        adapter, head, req = parse_evaluate_request(content, self._adapter_spec, self._head_spec)
        if req.fingerprint != self.fingerprint:
            raise ProtocolMismatch(
                "experiment config differs between developer and auditor "
                f"(fingerprint {req.fingerprint[:12]} != {self.fingerprint[:12]})"
            )
        load_adapter_state(model, adapter)
        model.head.load_state_dict(head)
        part = self.data["auditor_val" if req.split == "val" else "auditor_test"]
        scores = model.predict_scores(part.inputs, self.exp.eval_batch_size, self.cfg.device)
        report = fairness_report(part.y, scores, part.s, self.exp.threshold, self.cfg.min_group_size)
        log.info("round %d %s: accuracy %.4f, DPD %s", req.round, req.split,
                 report["accuracy"], report["demographic_parity_difference"])
        return make_evaluate_reply(report)


