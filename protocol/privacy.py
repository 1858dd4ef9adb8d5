"""What both parties agree on about privacy: the ``privacy`` reply record and the error codes.

Every reply carries a ``privacy`` record (:class:`PrivacyStatus`): the ε this experiment's
releases have spent so far and the ε the developer's ledger has spent over all its runs, at the
ledger's δ, against its budget. ε is ``None`` when the auditor runs without differential privacy.

An error reply carries only ``"<code>: <fixed message>"`` (:func:`public_error_text`): one fixed
text per error class, never the exception's own message, because that text can depend on the
auditor's data (a file name that encodes attributes, "some score was NaN" for a crafted model).
The only exceptions are :class:`PublicRefusal`\\ s, refusals whose text is built from the config
and the request sequence alone (the budget and what is spent, the run cap, the round order).
The full detail stays in the auditor's own log.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ERROR_CODES", "PrivacyStatus", "PublicRefusal", "epsilon_meaning", "guess_bound",
           "public_error_text"]


class PublicRefusal(RuntimeError):
    """A refusal whose message depends only on configuration and the request sequence, never on
    the auditor's data, so it may cross as written. Subclasses set :attr:`code`."""

    code = "E_REFUSED"


#: Exception class name → (code, the fixed message that crosses). Unlisted classes: ``E_INTERNAL``.
ERROR_CODES: dict[str, tuple[str, str]] = {
    "PayloadError": ("E_PAYLOAD", "a payload does not match the declared payload policy"),
    "FramingError": ("E_PAYLOAD", "a payload does not match the declared payload policy"),
    "ProtocolMismatch": ("E_PROTOCOL", "the request is for another experiment, method, stage or "
                                       "message type"),
    "StateUnavailable": ("E_STATE", "the auditor no longer holds the state this round must start from"),
    "SmallGroupError": ("E_SMALL_GROUP", "an evaluation part has a sensitive group below the "
                                         "auditor's min_group_size"),
    "DataError": ("E_DATA", "the auditor's data could not be loaded; see the auditor's log"),
    "ConfigError": ("E_CONFIG", "the auditor's configuration is invalid; see the auditor's log"),
    "AppNotApproved": ("E_APP", "the run's app bundle is not the build the auditor approved"),
    "NotPrivate": ("E_NOT_PRIVATE", "the method has no differentially private form; the auditor "
                                    "serves it only with [auditor.privacy] enabled = false"),
}
_INTERNAL = ("E_INTERNAL", "the auditor could not answer this request; see the auditor's log")


def public_error_text(err: BaseException) -> str:
    """The only text about ``err`` that may cross to the developer: ``"<code>: <message>"``.

    A :class:`PublicRefusal` keeps its own message (built from config and request sequence);
    every other error gets the fixed message of its class (:data:`ERROR_CODES`), or
    ``E_INTERNAL``.
    """
    if isinstance(err, PublicRefusal):
        return f"{err.code}: {err}"
    for cls in type(err).__mro__:
        if cls.__name__ in ERROR_CODES:
            code, message = ERROR_CODES[cls.__name__]
            return f"{code}: {message}"
    return f"{_INTERNAL[0]}: {_INTERNAL[1]}"


def guess_bound(epsilon: float, delta: float) -> float:
    """The highest probability with which any test tells two neighbouring datasets apart from an
    (ε, δ)-DP release, when each is a priori equally likely: (e^ε + δ) / (1 + e^ε).

    From the hypothesis-testing view of DP (Kairouz, Oh & Viswanath, ICML 2015, Thm. 2.1): every
    test's errors satisfy α + e^ε·β ≥ 1 − δ and e^ε·α + β ≥ 1 − δ, so α + β ≥ 2(1 − δ)/(1 + e^ε).

    Raises:
        ValueError: ``epsilon`` < 0 or ``delta`` outside [0, 1).
    """
    import math

    if epsilon < 0 or not 0 <= delta < 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta < 1, got {epsilon}, {delta}")
    if epsilon > 700:
        return 1.0
    return min(1.0, (math.exp(epsilon) + delta) / (1.0 + math.exp(epsilon)))


def epsilon_meaning(epsilon: float, delta: float) -> str:
    """ε in words a reviewer understands: how well anyone who sees every release can guess about
    one person, against a coin flip's 50 %.

    The ledger's neighbouring datasets differ by one person's record (added or removed), so the
    guess "is this person in the auditor's data" is bounded by :func:`guess_bound` at (ε, δ); a
    guess of a person's sensitive group, the record present either way, compares datasets that
    differ in one record's value (a removal and an addition), bounded at (2ε, 2δ) (group privacy).
    """
    member = guess_bound(epsilon, delta)
    group = guess_bound(2 * epsilon, min(2 * delta, 0.999))
    return (f"ε = {epsilon:.2f} (δ = {delta:g}): from everything released, a guess whether one given "
            f"person is in the auditor's data is right at most {100 * member:.0f} % of the time, and a "
            f"guess of one person's sensitive group at most {100 * group:.0f} %, where a coin flip is "
            f"right 50 %")


class PrivacyStatus(BaseModel):
    """The ``privacy`` record of every reply.

    ``epsilon_run``: ε spent by this experiment's releases so far (max over the auditor's
    disjoint parts); ``epsilon_total``: ε of the developer's whole ledger (all runs, composed);
    ``epsilon_budget``: the ledger's cap; ``delta``: the δ of both ε. ε and the budget are
    ``None`` without differential privacy (``dp = false``).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    dp: bool
    epsilon_run: float | None = Field(None, ge=0)
    epsilon_total: float | None = Field(None, ge=0)
    epsilon_budget: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
