"""serving/listeners.py: an API process swaps the shared, unlistened server socket for its own."""
from __future__ import annotations

import os
import socket

from chattts_vllm.serving.listeners import shared_listener_fds, take_own_listener


def _server_socket(reuse_port: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    return s


def test_the_shared_socket_is_replaced_by_one_of_our_own_on_the_same_port():
    shared = _server_socket()
    port = shared.getsockname()[1]
    inode = os.fstat(shared.fileno()).st_ino
    try:
        assert shared_listener_fds(port) == [shared.fileno()]
        assert take_own_listener(port)
        assert os.fstat(shared.fileno()).st_ino != inode        # same number, another socket
        assert shared.getsockname() == ("127.0.0.1", port)
        assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        shared.listen(8)                                         # what the HTTP server does
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = shared.accept()
            conn.close()
        assert shared_listener_fds(port) == []                   # now listening: nothing to take
        assert not take_own_listener(port)
    finally:
        shared.close()


def test_every_number_naming_the_shared_socket_is_replaced():
    shared = _server_socket()
    port = shared.getsockname()[1]
    second = os.dup(shared.fileno())
    try:
        assert sorted(shared_listener_fds(port)) == sorted([shared.fileno(), second])
        assert take_own_listener(port)
        assert os.fstat(second).st_ino == os.fstat(shared.fileno()).st_ino
        shared.listen(8)
        with socket.socket(fileno=os.dup(second)) as other:
            assert other.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        shared.close()
        os.close(second)


def test_nothing_changes_without_a_reuse_port_server_socket():
    plain = _server_socket(reuse_port=False)
    try:
        assert not take_own_listener(plain.getsockname()[1])
        assert not take_own_listener(1)                        # no socket on that port at all
    finally:
        plain.close()
