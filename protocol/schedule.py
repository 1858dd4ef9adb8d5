"""The request schedule of a run: which request the developer sends when. It exists once, here.

The developer's loop (:func:`developer.loop.run_experiment`) sends exactly these requests, the
auditor answers only these (each once, in this order, under DP: :func:`planned_requests`), its
ledger is charged for them, and ``bench/bytes.py`` measures them:

* before round 1, the method's round-0 request, if any (:func:`round0_want`);
* after each round r, a request when r is an evaluation round (r % ``eval_every`` == 0, or the
  last round: with the validation split) or the method asks for something after it
  (:func:`after_round`: ``round_want`` before round R, for a gated method (FairNet) the
  ``cond_want`` after round R and each conditional round but the last);
* after the last round, the ``final_want`` (last_layer's head, FairNet's τ), then the test
  report (:func:`final_requests`).
"""

from __future__ import annotations

from .methods import request_plan, total_rounds

__all__ = ["after_round", "final_requests", "planned_requests", "round0_want"]


def round0_want(exp) -> str:
    """What the developer asks for before round 1 (``"none"``: nothing)."""
    return request_plan(exp.method).round0_want


def after_round(exp, r: int) -> tuple[str, str] | None:
    """``(split, want)`` of the request sent after round ``r`` (1 ≤ r ≤ the last round), or None
    when nothing is sent after it."""
    last = total_rounds(exp)
    evaluate = r % exp.eval_every == 0 or r == last
    want = request_plan(exp.method).want_after(r, exp.rounds)
    if evaluate or want != "none":
        return ("val" if evaluate else "none", want)
    return None


def final_requests(exp) -> list[tuple[str, str]]:
    """``(split, want)`` of the requests after the last round, in order: the ``final_want`` (if
    any), then the test report."""
    final = request_plan(exp.method).final_want
    return ([("none", final)] if final != "none" else []) + [("test", "none")]


def planned_requests(exp) -> list[tuple[int, str, str]]:
    """Every request ``(round, split, want)`` a run of ``exp`` makes, in the order it makes them.

    Args:
        exp: a :class:`protocol.config.ExperimentConfig`.
    """
    last = total_rounds(exp)
    out: list[tuple[int, str, str]] = []
    if round0_want(exp) != "none":
        out.append((0, "none", round0_want(exp)))
    for r in range(1, last + 1):
        request = after_round(exp, r)
        if request is not None:
            out.append((r, *request))
    out += [(last, split, want) for split, want in final_requests(exp)]
    return out
