"""How a run ends: whose error a start-up failure is.

A rank's own socket error (an HTTP shard server that refuses the connection, a `pipe:` command
whose reader went away) carries the same words as a process group whose peer went away; taken for
a peer's, it went unprinted and rank 0 said only "another rank stopped during start-up".
"""

import contextlib
import io
import socket
import urllib.error
import urllib.request

import torch.distributed as dist

from helpers_dist import run_distributed

# What a gloo collective raised on rank 0 (torch 2.13) when rank 1 was killed mid-collective.
GLOO_PEER_ERROR = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:22916: Connection reset by peer. This is typically caused by a remote worker hanging "
    "or bugs in the application. Check the logs of the remote worker before reporting an error."
)


def _refused_http_error() -> urllib.error.URLError:
    """A real fetch of a shard from a port no server listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/train-0000.tar", timeout=5)
    except urllib.error.URLError as exc:
        return exc
    raise AssertionError("a closed port answered")


def _report_an_unreachable_shard_server(rank: int, world: int) -> str:
    from vutrain import startup_errors

    exc = _refused_http_error() if rank == 1 else RuntimeError(GLOO_PEER_ERROR)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        startup_errors.report(exc, rank, world)
    return stderr.getvalue()


def test_a_ranks_own_connection_refused_is_printed_as_its_error():
    """Rank 1 cannot reach the HTTP shard server (a real urlopen: "Connection refused"), rank 0's
    collective with it fails (gloo's "Connection reset by peer"): on 2 gloo ranks rank 0 prints
    rank 1's message, once, instead of "another rank stopped during start-up"."""
    printed = run_distributed(_report_an_unreachable_shard_server, 2)
    lines = [line for out in printed for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: rank 1: URLError: <urlopen error"), lines
    assert "Connection refused" in lines[0] and "another rank" not in lines[0], lines


def test_own_socket_errors_are_not_peer_failures_but_the_groups_are():
    """A refused HTTP fetch, a broken pipe and a socket timeout are this rank's own; gloo's reset,
    the store's DistNetworkError and NCCL's remote error are a peer's."""
    from vutrain.startup_errors import is_peer_failure

    own = [_refused_http_error(), BrokenPipeError(32, "Broken pipe"), TimeoutError("Socket Timeout")]
    assert [is_peer_failure(exc) for exc in own] == [False, False, False]
    peers = [
        RuntimeError(GLOO_PEER_ERROR),
        dist.DistNetworkError("Connection refused"),
        dist.DistBackendError("NCCL error: remote process exited or there was a network error"),
    ]
    assert [is_peer_failure(exc) for exc in peers] == [True, True, True]
