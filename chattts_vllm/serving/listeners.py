"""One listening socket per API server process, so that the kernel spreads connections over them.

`vllm serve --api-server-count N` binds one socket in its parent process and hands it to all N
API processes, which all accept on it. A burst of new connections then lands mostly in whichever
process wakes first (27 of 32 connections in one of 4 processes, measured on a 2-core machine),
and a client keeps its connection, so its later requests stay there too: at 64 simultaneous
streams a few processes did the per-frame work and the decodes of most of them.

vLLM already sets SO_REUSEPORT on that socket. Here each API process binds its own socket to the
same address, with SO_REUSEPORT, in place of the inherited one (same descriptor number, so the
server started afterwards listens on it), and the shared socket is never put into listening. The
kernel then hashes every new connection to one of the N sockets: for 64 connections over 8
processes the median stream shares its process with about 9 (8 if perfectly even).
"""
from __future__ import annotations

import os
import socket
import stat

from vllm.logger import init_logger

logger = init_logger(__name__)


def enabled() -> bool:
    """CHATTTS_VLLM_OWN_LISTENER (default on): 0 keeps vLLM's one shared socket."""
    return os.environ.get("CHATTTS_VLLM_OWN_LISTENER", "1").strip().lower() not in ("0", "false", "no", "off")


def _unlistened_stream_socket(fd: int, port: int) -> socket.socket | None:
    """A duplicate of `fd` if it is an IPv4/IPv6 stream socket bound to `port` with SO_REUSEPORT,
    neither connected nor listening (what vLLM hands its API processes); else None."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if (s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM
                and s.getsockname()[1] == port
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
                and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            try:
                s.getpeername()
            except OSError:
                return s                   # not connected: the server's socket
    except OSError:
        pass
    s.close()
    return None


def shared_listener_fds(port: int) -> list[int]:
    """The descriptors of the inherited, not yet listening server socket on `port` (all numbers
    naming it), or [] unless there is exactly one such socket."""
    found: dict[int, list[int]] = {}
    for name in os.listdir("/proc/self/fd"):
        s = _unlistened_stream_socket(int(name), port)
        if s is not None:
            found.setdefault(os.fstat(s.fileno()).st_ino, []).append(int(name))
            s.close()
    return next(iter(found.values())) if len(found) == 1 else []


def take_own_listener(port: int) -> bool:
    """Replace this process's shared server socket on `port` by one of its own (see the module
    docstring). Call before the HTTP server starts. False (nothing changed) if there is no such
    socket, e.g. a single API process, a Unix socket, or a server that already listens."""
    fds = shared_listener_fds(port)
    if not fds:
        return False
    shared = socket.socket(fileno=os.dup(fds[0]))
    try:
        own = socket.socket(shared.family, socket.SOCK_STREAM)
        try:
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if shared.family == socket.AF_INET6:
                own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                               shared.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            own.bind(shared.getsockname())   # listening starts with the server: no queue before it
            for fd in fds:
                os.dup2(own.fileno(), fd)    # the server's socket object now names this socket
        finally:
            own.close()
    finally:
        shared.close()
    logger.info("API server process %d listens on its own socket for port %d", os.getpid(), port)
    return True
