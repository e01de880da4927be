"""Start-up review 13: an unresolvable MASTER_ADDR is one clean line, like the other start-up errors
(it read "...: RuntimeError: MASTER_ADDR=... : export MASTER_ADDR ...; check MASTER_ADDR / MASTER_PORT")."""

from __future__ import annotations

import dataclasses

from rendezvous_ranks import rank_env
from startup_ranks import dist_info, error_lines, rank_script, run_ranks
from worker_ports import free_port

from vutrain import distributed, startup_errors


def assert_one_clean_line(line: str) -> None:
    assert "RuntimeError" not in line, line
    # "MASTER_ADDR=...: export MASTER_ADDR ...", and no second "check MASTER_ADDR / MASTER_PORT".
    assert line.count("MASTER_ADDR") == 2 and "MASTER_PORT" not in line, line


def test_unresolvable_master_addr_is_one_line_without_type_or_repeated_advice():
    """One process as train.py starts it (RFC 6761: .invalid never resolves)."""
    env = rank_env(0, 1, free_port())
    env["MASTER_ADDR"] = "no-such-host.invalid"
    [(code, out)] = run_ranks(rank_script(), [env], wait_s=60)
    assert code == 1, out[-3000:]
    [line] = error_lines(out)
    assert "MASTER_ADDR=no-such-host.invalid is not a host name this node can resolve" in line, line
    assert_one_clean_line(line)


def test_unresolvable_first_slurm_node_is_one_line_too():
    """The SLURM wording (no MASTER_ADDR exported, scontrol gave no NodeAddr), as train.py prints it."""
    info = dataclasses.replace(dist_info(0, 29500, world=1), master_addr="n1.invalid", launcher="slurm")
    try:
        distributed.check_rendezvous_host(info, env={})
    except RuntimeError as exc:
        line = startup_errors.rendezvous_message(info, exc)
    else:
        raise AssertionError("n1.invalid was taken for a resolvable host")
    assert "the first node of this SLURM step, n1.invalid, is not a host name" in line, line
    assert "RuntimeError" not in line and "check MASTER_ADDR" not in line, line
