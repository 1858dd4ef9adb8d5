"""The auditor's side of the protocol: answer the developer's round requests on its own data.

:class:`AuditorService` is transport-free: the Flower ClientApp (:mod:`auditor.clientapp`) and the
co-located reference runner both call :meth:`AuditorService.handle` with a request ``RecordDict``
and send back the ``RecordDict`` it returns. Everything that leaves the auditor passes
:func:`protocol.messages.make_reply`, which admits only the records the request asked for:
aggregate metrics, and an adapter-shaped signal or per-module update.

Order of checks on every request: payload records/keys/shapes/dtypes/finiteness, message type,
experiment fingerprint and method; only then is the auditor's data read (lazily, once per
process). State that must survive between rounds (the adversary or sensitive classifier, the
sensitive LoRA's A_s) lives in a ``RecordDict`` that stays on the auditor: Flower's
``context.state`` in deployment, an in-memory one in the co-located runner.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from protocol.config import AuditorConfig, ExperimentConfig, experiment_fingerprint
from protocol.data import Dataset, load_split
from protocol.messages import RoundRequest, make_reply, message_type_for, parse_request
from protocol.metrics import fairness_report
from protocol.model import (
    FairsplitModel,
    adapter_state,
    build_model,
    head_state,
    load_adapter_state,
    resolve_image_size,
    state_spec,
    subtract_weight_update,
)

from . import methods as M

__all__ = ["AuditorService", "ProtocolMismatch"]

log = logging.getLogger(__name__)

_PROBE = "fairsplit.probe"
_PROBE_META = "fairsplit.probe_meta"
_SENS_A = "fairsplit.sensitive_A"
_SENS_META = "fairsplit.sensitive_meta"
_UNLEARN = "fairsplit.unlearning_update"


class ProtocolMismatch(ValueError):
    """The developer's request is for a different experiment, method or message type."""


class AuditorService:
    """Answers the developer's requests on the auditor's data.

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
        self._state = RecordDict()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)

    @property
    def model(self) -> FairsplitModel:
        """The shared backbone + LoRA + head (built once)."""
        if self._model is None:
            self._model = build_model(self.exp).to(self.cfg.device)
            self.adapter_spec = state_spec(adapter_state(self._model))
            self.head_spec = state_spec(head_state(self._model))
        return self._model

    @property
    def data(self) -> dict[str, Dataset]:
        """The auditor's parts: auditor_train, auditor_val, auditor_test (with sensitive groups)."""
        if self._data is None:
            cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else None
            self._data = load_split(self.cfg.data, self.exp, "auditor",
                                    resolve_image_size(self.exp.model), cache)
            codes, names = M.encode_groups(self._data["auditor_train"].s)
            self._train_codes, self._group_names = codes, names
            if len(names) < 2:
                raise ValueError("the auditor's training part has fewer than 2 sensitive groups")
        return self._data

    # ------------------------------------------------------------------------------------
    def handle(self, message_type: str, content: RecordDict, state: RecordDict | None = None) -> RecordDict:
        """Answer one request.

        Args:
            message_type: Flower message type (``evaluate`` or ``train``, per the request).
            content: the request's records (see :mod:`protocol.messages`).
            state: the auditor's persistent state between rounds (kept on the auditor).

        Returns:
            The reply's records, exactly those the request asked for.

        Raises:
            ProtocolMismatch: wrong message type, a different experiment fingerprint or method.
            protocol.codec.PayloadError: the request violates the payload contract.
            protocol.metrics.SmallGroupError: an evaluation group is below ``min_group_size``.
        """
        state = self._state if state is None else state
        model = self.model
        adapter, head, req = parse_request(content, self.adapter_spec, self.head_spec)
        if message_type != message_type_for(req):
            raise ProtocolMismatch(f"message type {message_type!r} does not match the request "
                                   f"(expected {message_type_for(req)!r})")
        if req.fingerprint != self.fingerprint:
            raise ProtocolMismatch(
                "experiment config differs between developer and auditor "
                f"(fingerprint {req.fingerprint[:12]} != {self.fingerprint[:12]})")
        if req.method != self.exp.method.name:
            raise ProtocolMismatch(f"method {req.method!r} != agreed {self.exp.method.name!r}")
        self._sync_unlearning(state)
        load_adapter_state(model, adapter)

        signal = update = signal_metrics = report = None
        if req.want == "signal":
            signal, signal_metrics = self._signal(req, state)
        elif req.want == "unlearning_update":
            update, signal_metrics = self._unlearning_update()
            state[_UNLEARN] = ArrayRecord(update)
            self._sync_unlearning(state)
        if req.split != "none":
            model.head.load_state_dict(head)
            part = self.data["auditor_val" if req.split == "val" else "auditor_test"]
            scores = model.predict_scores(part.inputs, self.exp.eval_batch_size, self.cfg.device)
            report = fairness_report(part.y, scores, part.s, self.exp.threshold, self.cfg.min_group_size)
            log.info("round %d %s: accuracy %.4f, DPD %s", req.round, req.split,
                     report["accuracy"], report["demographic_parity_difference"])
        return make_reply(req, report=report, signal=signal, update=update,
                          signal_metrics=signal_metrics, adapter_spec=self.adapter_spec)

    def _sync_unlearning(self, state: RecordDict) -> None:
        """Evaluate the model the developer trains: W0 − λ·ΔW_s once the update exists.

        ΔW_s stays in the auditor's state; it is applied once per model instance (a fresh
        ClientApp process rebuilds the model from W0 and re-applies it).
        """
        if _UNLEARN in state and not getattr(self, "_unlearned", False):
            update = state[_UNLEARN].to_torch_state_dict()
            subtract_weight_update(self.model, update, self.exp.method.lam)
            self._unlearned = True

    def _group_names_loaded(self) -> list[str]:
        """Group names of the auditor's training part (loads the data on first use)."""
        self.data  # noqa: B018 - property loads and encodes the groups
        return self._group_names

    # ------------------------------------------------------------------------------------
    def _round_batch(self, round_: int, salt: int = 0):
        train = self.data["auditor_train"]
        idx = M.batch_indices(len(train), self.exp.method.auditor_batch_size, self.exp.seed, round_, salt)
        inputs = train.inputs[idx] if isinstance(train.inputs, np.ndarray) else [train.inputs[i] for i in idx]
        return inputs, torch.as_tensor(self._train_codes[idx])

    def _signal(self, req: RoundRequest, state: RecordDict):
        m, method = self.exp.method, self.exp.method.name
        model, device = self.model, self.cfg.device
        n_groups = len(self._group_names_loaded())
        inputs, s = self._round_batch(req.round)
        s = s.to(device)
        acc = None
        if method in ("adversarial", "entropy"):
            refit = method == "adversarial" or _PROBE not in state or (
                m.refresh_every > 0 and req.round - int(state[_PROBE_META]["fitted_round"]) >= m.refresh_every)
            if refit:
                fit_inputs, fit_s = (inputs, s) if method == "adversarial" else self._round_batch(req.round, salt=1)
                feats = M._features(model, fit_inputs, device)
                init = None
                if method == "adversarial" and _PROBE in state:
                    init = state[_PROBE].to_torch_state_dict()
                probe = M.fit_probe(feats, fit_s.to(device), n_groups, m.auditor_steps, m.auditor_lr,
                                    init, self.exp.seed + req.round)
                state[_PROBE] = ArrayRecord(probe.state_dict())
                state[_PROBE_META] = ConfigRecord({"fitted_round": req.round})
            else:
                probe = torch.nn.Linear(model.feature_dim, n_groups)
                probe.load_state_dict(state[_PROBE].to_torch_state_dict())
            probe = probe.to(device)
            for p in probe.parameters():
                p.requires_grad_(False)
            term = M.adversarial_term if method == "adversarial" else M.entropy_term
            grads, objective, acc = term(model, probe, inputs, s, m.lam, device)
        elif method == "orthogonality":
            refit = _SENS_A not in state or (
                m.sensitive_refresh_every > 0
                and req.round - int(state[_SENS_META]["fitted_round"]) >= m.sensitive_refresh_every)
            if refit:
                train = self.data["auditor_train"]
                model_s, acc = M.train_sensitive_adapter(self.exp, train.inputs, self._train_codes,
                                                         n_groups, device)
                state[_SENS_A] = ArrayRecord(M.sensitive_A(model_s))
                state[_SENS_META] = ConfigRecord({"fitted_round": req.round, "accuracy": acc})
            else:
                acc = float(state[_SENS_META]["accuracy"])
            a_s = state[_SENS_A].to_torch_state_dict()
            grads, objective = M.orthogonality_term(model, a_s, m.lam)
        else:
            raise ProtocolMismatch(f"method {method!r} has no per-round signal")
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
        metrics = {"n": int(len(s)), "objective": objective, "sensitive_accuracy": acc, "signal_norm": norm}
        return grads, metrics

    def _unlearning_update(self):
        if self.exp.method.name != "unlearning":
            raise ProtocolMismatch("an unlearning update is only served for method 'unlearning'")
        if getattr(self, "_unlearned", False):
            raise ProtocolMismatch("the unlearning update was already served for this run")
        train = self.data["auditor_train"]
        model_s, acc = M.train_sensitive_adapter(self.exp, train.inputs, self._train_codes,
                                                 len(self._group_names_loaded()), self.cfg.device)
        update = M.sensitive_update(model_s)
        norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())))
        metrics = {"n": min(len(train), self.exp.method.auditor_batch_size), "objective": 0.0,
                   "sensitive_accuracy": acc, "signal_norm": norm}
        return update, metrics
