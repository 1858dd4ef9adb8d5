"""Deployment recovery: the developer's channel to the auditor's SuperNode (stale nodes after a
``kill -9``, paced re-sends after transient errors) and the auditor's launcher on permanent
SuperNode failures (issue 19).

The channel's timing is tested with a fake Grid and a fake clock (fast, deterministic); the
stale-node wait and the launcher's refusal once each over real Flower processes on loopback
(TLS, SuperNode authentication).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import RecordDict
from flwr.common.constant import ErrorCode

import fairsplit.developer.serverapp as serverapp
from fairsplit.developer.loop import AuditorError
from fairsplit.developer.serverapp import FlowerChannel
from fairsplit.protocol.framing import pack


class Clock:
    """Stands in for the ``time`` module in :mod:`developer.serverapp`."""

    def __init__(self):
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def _error(code: int, about: str) -> SimpleNamespace:
    return SimpleNamespace(has_error=lambda: True, error=SimpleNamespace(code=code, reason=f"code {code}"),
                           metadata=SimpleNamespace(reply_to_message_id=about))


def _reply(about: str) -> SimpleNamespace:
    return SimpleNamespace(has_error=lambda: False, content=pack(RecordDict()),
                           metadata=SimpleNamespace(reply_to_message_id=about))


class FakeGrid:
    """``nodes(t)``: the online node IDs at time t; ``replies(grid, ids)``: what a pull returns."""

    def __init__(self, clock: Clock, nodes, replies=lambda grid, ids: []):
        self.clock, self.nodes, self.replies = clock, nodes, replies
        self.pushed: list[tuple[float, int, str]] = []  # (time, destination, message id)
        self.node_queries = 0

    def get_node_ids(self) -> list[int]:
        self.node_queries += 1
        return list(self.nodes(self.clock.t))

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            ids.append(f"m{len(self.pushed) + 1}")
            self.pushed.append((self.clock.t, m.metadata.dst_node_id, ids[-1]))
        return ids

    def pull_messages(self, ids) -> list:
        return self.replies(self, list(ids))


def _message(content, dst_node_id: int, message_type: str) -> SimpleNamespace:
    """Stands in for Flower's Message (which needs a ServerApp task's run ID)."""
    return SimpleNamespace(content=content, metadata=SimpleNamespace(dst_node_id=dst_node_id,
                                                                     message_type=message_type))


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(serverapp, "time", c)
    monkeypatch.setattr(serverapp, "Message", _message)
    return c


# -- 1: more than one SuperNode online --------------------------------------------------------


def test_stale_node_is_waited_out_not_refused(clock):
    """A SuperNode killed with ``kill -9`` stays online until Flower expires it; the channel
    waits for that instead of failing at once (the old code raised at t = 0)."""
    grid = FakeGrid(clock, lambda t: [7, 9] if t < 45 else [9])
    channel = FlowerChannel(grid, node_timeout=120)
    assert channel.node_id == 9
    assert 45 <= clock.t < 46


def test_node_errors_say_how_many_and_how_long(clock):
    grid = FakeGrid(clock, lambda t: [7, 9])
    with pytest.raises(AuditorError, match=r"found 2 online \(7, 9\) after waiting 30\.\d s"):
        FlowerChannel(grid, node_timeout=30)
    assert clock.t >= 30 and grid.node_queries > 100  # it did wait, polling
    clock.t = 0.0
    with pytest.raises(AuditorError, match=r"no auditor SuperNode online after waiting 10\.\d s"):
        FlowerChannel(FakeGrid(clock, lambda t: []), node_timeout=10)


# -- 2: paced re-sends -------------------------------------------------------------------------


def test_transient_errors_on_every_poll_resend_once_per_period(clock, caplog):
    """Flower repeats a copy's NODE_UNAVAILABLE error on every pull. Only the first error about
    the latest copy brings one re-send forward; after that, copies go out ``resend_after`` apart,
    and the warning is logged once per ``resend_after`` (the old code re-sent every 2 s and
    warned on every poll)."""
    resend, timeout = 15.0, 200.0
    grid = FakeGrid(clock, lambda t: [5],
                    lambda grid, ids: [_error(ErrorCode.NODE_UNAVAILABLE, i) for i in ids])
    channel = FlowerChannel(grid, reply_timeout=timeout, resend_after=resend)
    with caplog.at_level("WARNING", logger="fairsplit.developer.serverapp"):
        with pytest.raises(AuditorError, match=r"no reply from the auditor within 200 s"):
            channel.send("evaluate", RecordDict())
    times = [t for t, _, _ in grid.pushed]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] == pytest.approx(2.0, abs=0.2)  # brought forward once (transient_delay)
    assert all(g >= resend for g in gaps[1:]), gaps
    assert len(times) <= 2 + timeout / resend
    unavailable = [r for r in caplog.records if "auditor unavailable" in r.getMessage()]
    assert 1 <= len(unavailable) <= 1 + timeout / resend
    assert channel.resends == len(times) - 1


def test_error_about_an_older_copy_does_not_bring_the_next_forward(clock):
    """The first copy's error arrives only after the regular re-send: it is stale news, and the
    third copy still waits its full period."""
    resend = 15.0

    def replies(grid, ids):
        if clock.t >= resend + 1 and len(grid.pushed) == 2:
            return [_error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ids[0])]
        if clock.t >= 2 * resend + 5:
            return [_reply(ids[-1])]
        return []

    grid = FakeGrid(clock, lambda t: [5], replies)
    channel = FlowerChannel(grid, reply_timeout=100, resend_after=resend)
    channel.send("evaluate", RecordDict())
    times = [t for t, _, _ in grid.pushed]
    assert len(times) == 3 and times[1] == pytest.approx(resend, abs=0.1)
    assert times[2] == pytest.approx(2 * resend, abs=0.2)


def test_reply_payload_that_never_arrives_is_given_up_after_max_time():
    """Flower's Grid pulls a reply's payload objects for up to 2 h (about 250 s at the patched
    0.5 s cap) before it reports the reply unavailable; the channel bounds that wait, so the
    request is re-sent (the old ``quick_object_retries`` took no bound)."""
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

    from fairsplit.developer.flower_compat import quick_object_retries

    original = http_grid.pull_objects
    try:
        quick_object_retries(max_time=0.5)
        quick_object_retries(max_time=0.3)  # a later run's setting replaces the earlier one
        assert http_grid.pull_objects.keywords["max_time"] == 0.3

        def never(object_id: str) -> bytes:
            raise ObjectUnavailableError(object_id)

        start = time.monotonic()
        with pytest.raises(ObjectPullError):
            http_grid.pull_objects(object_ids=["a", "b"], pull_object_fn=never)
        assert time.monotonic() - start < 3.0
        with pytest.raises(ValueError, match="max_time"):
            quick_object_retries(max_time=0)
    finally:
        http_grid.pull_objects = original


# -- over real Flower processes ----------------------------------------------------------------


#: A SuperNode that heartbeats every 10 s (Flower's minimum) instead of 30 s, so that once killed
#: it is marked offline 20 s after its last heartbeat rather than 60 s.
_QUICK_HEARTBEAT_SUPERNODE = (
    "import sys, flwr.supercore.heartbeat as h, flwr.supernode.fleet_http_connection as f; "
    "h.HEARTBEAT_DEFAULT_INTERVAL = f.HEARTBEAT_DEFAULT_INTERVAL = 10; "
    "from flwr.supernode.cli import flower_supernode; sys.argv[0] = 'flower-supernode'; "
    "sys.exit(flower_supernode())")


@pytest.mark.flower
def test_channel_waits_out_a_killed_supernode_then_takes_the_live_one(tmp_path, flwr_env):
    """``fairsplit run --resume`` after ``kill -9``: the dead SuperNode (its key from the earlier
    attempt) is still online at the SuperLink next to the new one. The channel waits until
    Flower marks it offline and takes the live node (the old code failed at once: "found 2")."""
    import signal

    from flower_helpers import wait_gone

    from fairsplit.deploy.certs import generate, generate_supernode_keys
    from fairsplit.deploy.flower import (APP_DIR, TLS, ProcessGroup, free_port, register_supernode,
                               start_superlink, submit_run, write_flwr_home)
    from fairsplit.developer.flower_compat import ServerAppTask, TaskSource

    creds = generate(tmp_path / "certs")
    old = generate_supernode_keys(tmp_path / "old-attempt")
    home = tmp_path / "home"
    with ProcessGroup() as group:
        superlink = start_superlink(group, free_port(), tmp_path / "superlink.log", isolation="process",
                                    tls=TLS(creds["ca"], creds["cert"], creds["key"]))
        write_flwr_home(home, superlink, creds["ca"])
        stale_id = register_supernode(home, old["pub"])
        live_id = register_supernode(home, creds["supernode_pub"])
        tls = ["--superlink", superlink, "--isolation", "process", "--root-certificates", str(creds["ca"])]
        stale = group.start("stale", [sys.executable, "-c", _QUICK_HEARTBEAT_SUPERNODE, *tls,
                                      "--port", str(free_port()), "--auth-supernode-private-key",
                                      str(old["key"])], tmp_path / "stale.log")
        group.start("live", [sys.executable, "-m", "fairsplit.auditor.supernode", *tls, "--port", str(free_port()),
                             "--auth-supernode-private-key", str(creds["supernode_key"])],
                    tmp_path / "live.log")
        submit_run(home, {"developer-config": "unused", "out-dir": str(tmp_path / "out")},
                   tmp_path / "flwr.log", app_dir=APP_DIR)
        source = TaskSource(superlink, creds["ca"].read_bytes())
        deadline = time.monotonic() + 60
        while (token := source.acquire()) is None:
            assert time.monotonic() < deadline, "the SuperLink offered no ServerApp task"
            time.sleep(0.2)
        task = ServerAppTask(source, token)
        try:
            while sorted(task.grid.get_node_ids()) != sorted([stale_id, live_id]):
                assert time.monotonic() < deadline, (tmp_path / "stale.log").read_text()[-2000:]
                group.check_alive()
                time.sleep(0.3)
            os.kill(stale.pid, signal.SIGKILL)  # no deactivation: it stays online for a while
            stale.wait(timeout=10)
            assert sorted(task.grid.get_node_ids()) == sorted([stale_id, live_id])
            start = time.monotonic()
            channel = FlowerChannel(task.grid, node_timeout=50)
            waited = time.monotonic() - start
            assert channel.node_id == live_id
            assert waited <= 25, waited  # 2 × the 10 s heartbeat interval, plus slack
        finally:
            task.finish("completed", "")
            source.close()
    assert wait_gone(str(tmp_path)) == []


@pytest.mark.flower
def test_auditor_stops_with_the_cause_when_its_key_is_refused_or_the_ca_is_wrong(tmp_path, flwr_env):
    """``fairsplit auditor`` against a real SuperLink (TLS, SuperNode auth): with a key the
    developer never registered it says so and exits non-zero once ``--refused-grace`` has passed;
    with another CA it exits at once, naming the certificate error literally (brackets kept).
    The old launcher restarted the SuperNode every 2 s, forever, saying only "dialling"."""
    import subprocess

    from flower_helpers import kill_tree, tiny_run, wait_gone

    from fairsplit.deploy.certs import generate, generate_supernode_keys
    from fairsplit.deploy.flower import TLS, ProcessGroup, free_port, register_supernode, start_superlink, write_flwr_home
    from fairsplit.deploy.launch import write_party_files

    creds = generate(tmp_path / "certs")
    other = generate(tmp_path / "other-developer")
    stranger = generate_supernode_keys(tmp_path / "stranger")
    _, aud_cfg = write_party_files(tiny_run(state_dir=str(tmp_path / "auditor-state")), tmp_path / "cfg")

    def auditor(name: str, ca: Path, key: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "fairsplit.deploy.cli", "auditor", "--config", str(aud_cfg),
             "--superlink", superlink, "--logs", str(tmp_path / name), "--root-certificates", str(ca),
             "--auth-key", str(key), "--refused-grace", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "COLUMNS": "400"})  # rich: one line per message

    with ProcessGroup() as group:
        superlink = start_superlink(group, free_port(), tmp_path / "superlink.log",
                                    tls=TLS(creds["ca"], creds["cert"], creds["key"]))
        write_flwr_home(tmp_path / "home", superlink, creds["ca"])
        register_supernode(tmp_path / "home", creds["supernode_pub"])  # the auditor's, not the stranger's
        procs = {"unregistered": auditor("unregistered", creds["ca"], stranger["key"]),
                 "wrong-ca": auditor("wrong-ca", other["ca"], creds["supernode_key"])}
        start, out, took = time.monotonic(), {}, {}
        try:
            for name, p in procs.items():
                out[name], _ = p.communicate(timeout=max(1.0, 90 - (time.monotonic() - start)))
                took[name] = time.monotonic() - start
        finally:
            for p in procs.values():
                kill_tree(p.pid)
        group.check_alive()  # the SuperLink itself is fine
    for name, p in procs.items():
        assert p.returncode == 2, (name, out[name][-3000:])
    refused = " ".join(out["unregistered"].split())
    assert "refused this SuperNode's key" in refused and "not registered" in refused, refused[-3000:]
    assert "[code: 2004] Failed to activate SuperNode." in refused
    wrong_ca = " ".join(out["wrong-ca"].split())
    assert "[SSL: CERTIFICATE_VERIFY_FAILED]" in wrong_ca and "retrying will not help" in wrong_ca, wrong_ca[-3000:]
    assert took["wrong-ca"] < took["unregistered"] or took["wrong-ca"] < 60
    assert wait_gone(str(tmp_path)) == []


def test_supernode_exit_causes_from_flowers_log():
    """Flower's SuperNode always exits with status 1; the cause is its logged exit code."""
    from fairsplit.auditor.flower_compat import classify_supernode_exit

    def exit_log(code: int, message: str) -> str:
        return (f"\x1b[91mERROR \x1b[0m:     Exit Code: {code}\n{message}\nThe SuperNode could not "
                f"establish a connection to the SuperLink.\n\nFor more information, visit: <x>\nINFO: bye\n")

    refused = classify_supernode_exit(exit_log(305, "Failed to initialize the connection to the "
                                               "SuperLink.\n[code: 2004] Failed to activate SuperNode."))
    assert (refused.code, refused.refused, refused.permanent) == (305, True, False)
    assert refused.reason.startswith("Failed to initialize") and "\x1b" not in refused.reason
    wrong_ca = classify_supernode_exit(exit_log(305, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                                "verify failed: unable to get local issuer certificate"))
    assert wrong_ca.permanent and not wrong_ca.refused
    eof = classify_supernode_exit(exit_log(305, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred"))
    assert not eof.permanent  # e.g. the SuperLink restarting mid-handshake
    assert classify_supernode_exit(exit_log(302, "bad key")).permanent
    lost = classify_supernode_exit("WARNING: Connection attempt failed\nINFO: SuperNode terminated gracefully.\n")
    assert (lost.code, lost.permanent, lost.refused) == (None, False, False)
