"""Idle and slow connections cannot stall the server: agents are answered while they last.

Against the real gunicorn (2 workers x 4 threads, TLS, optional client certificates): hundreds of TCP
connections that send nothing, TLS connections that finish the handshake and then send nothing, and
connections that send one byte a second of a TLS ClientHello, of the HTTP head after the handshake, or of a
request body. Before the fix, 8 of them were enough to leave every agent without an answer. Meanwhile an
agent keeps asking, each time on a new connection (a handshake of its own, the case that stalled), and on
one it keeps alive, and enrolls a user: every request is answered within the agent's socket timeout.
The server then hangs up on every one of the idle and slow connections by itself.
"""

from __future__ import annotations

import base64
import contextlib
import json
import resource
import select
import socket
import ssl
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.fault import records

IDLE = 300  # plain TCP, nothing sent
IDLE_TLS = 20  # handshake done, nothing sent
SLOW = 10  # of each kind, one byte a second: more than the 8 threads of the server
ROUNDS = 20  # agent requests on new connections, and as many on a kept-alive one
AGENT_TIMEOUT = 10.0  # the agent's socket timeout: "answered" means within it
GIVE_UP = 30.0  # the test stops waiting for the server to hang up on the slow connections
PROFILE = "smime-encryption-ec"
PASSWORD = "idle-connections-1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = records.World(tmp_path_factory.mktemp("idle-connections"), 2)
    yield w
    w.close()


@pytest.fixture
def open_files():
    """Room for the test's sockets (each one a file descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * (IDLE + IDLE_TLS + 3 * SLOW) + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Trickle:
    """A connection that sends `message` one byte a second, as long as the server lets it."""

    def __init__(self, sock: socket.socket, message: bytes, kind: str) -> None:
        self.sock, self.message, self.kind = sock, message, kind
        self.sent = 0
        self.hung_up = False

    def step(self) -> None:
        if self.hung_up or self.sent == len(self.message):
            return
        if server_hung_up(self.sock):
            self.hung_up = True
            return
        try:
            self.sock.send(self.message[self.sent:self.sent + 1])
            self.sent += 1
        except OSError:
            self.hung_up = True


def server_hung_up(sock: socket.socket) -> bool:
    """The server closed the connection (end of stream or reset); it never sends anything unasked."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        raise AssertionError("the server sent data on a connection that sent no request")
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        data = sock.recv(1)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:  # reset, or a TLS error after the server's close
        return True
    finally:
        sock.settimeout(timeout)
    assert not data, f"the server answered {data!r} to a request that never arrived"
    return True


def connect(address) -> socket.socket:
    """A TCP connection that gives up like an agent does: nothing here waits longer than its timeout."""
    return socket.create_connection(address, timeout=AGENT_TIMEOUT)


def client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes a TLS client sends first, for a connection that sends them one at a time."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:  # waiting for the ServerHello
        pass
    return outgoing.read()


def nonce_reply(conn) -> str:
    reply = conn.request("GET", "/api/v1/nonce")
    assert reply.status == 200, (reply.status, reply.body[:300])
    return reply.json()["nonce"]


def agent_nonce(w) -> str:
    """A nonce on a new connection: a TLS handshake with the agent's certificate (what stalled)."""
    fresh = w.connection()
    fresh.timeout = AGENT_TIMEOUT
    try:
        return nonce_reply(fresh)
    finally:
        fresh.close()


def test_agents_are_answered_while_hundreds_of_idle_and_slow_connections_are_open(world, open_files):
    w = world
    address = ("127.0.0.1", int(w.platform.url.rsplit(":", 1)[1]))
    anonymous = ssl.create_default_context(cafile=str(w.platform.tls_ca))  # an attacker needs no certificate
    padding = b"X-Padding: " + b"p" * 200 + b"\r\n"
    slow_messages = {
        "ClientHello": client_hello(anonymous),
        "HTTP head": b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + padding + b"\r\n",
        "request body": b"POST /api/v1/enroll HTTP/1.1\r\nHost: localhost\r\nContent-Length: 300\r\n\r\n"
                        + b"{" * 300,
    }
    stop = threading.Event()
    with contextlib.ExitStack() as sockets:
        def connect_tls() -> ssl.SSLSocket:
            tcp = sockets.enter_context(connect(address))
            return sockets.enter_context(anonymous.wrap_socket(tcp, server_hostname="localhost"))

        kept_alive = w.connection()
        sockets.callback(kept_alive.close)
        kept_alive.timeout = AGENT_TIMEOUT
        nonce_reply(kept_alive)  # its connection is open before the flood

        # First what needs nothing of the server (TCP connections that send nothing, or a ClientHello
        # byte by byte), and the agent is answered; then what completes a handshake first.
        idle = [sockets.enter_context(connect(address)) for _ in range(IDLE)]
        trickles = [Trickle(sockets.enter_context(connect(address)), slow_messages["ClientHello"], "ClientHello")
                    for _ in range(SLOW)]
        nonces = {agent_nonce(w), nonce_reply(kept_alive)}
        idle += [connect_tls() for _ in range(IDLE_TLS)]
        trickles += [Trickle(connect_tls(), message, kind)
                     for kind, message in slow_messages.items() if kind != "ClientHello" for _ in range(SLOW)]

        def trickle_every_second():
            deadline = time.monotonic() + GIVE_UP
            while not stop.is_set() and time.monotonic() < deadline and not all(t.hung_up for t in trickles):
                for t in trickles:
                    t.step()
                stop.wait(1.0)

        trickler = threading.Thread(target=trickle_every_second, name="trickle")
        trickler.start()
        sockets.callback(trickler.join)
        sockets.callback(stop.set)

        for round_ in range(ROUNDS):
            nonces |= {agent_nonce(w), nonce_reply(kept_alive)}
            if round_ == 0:  # what the agent was answered through: everything still open
                assert not [s for s in idle if server_hung_up(s)]
                assert not [t.kind for t in trickles if t.hung_up]
        assert len(nonces) == 2 * (ROUNDS + 1)

        agent = w.connection()
        agent.timeout = AGENT_TIMEOUT
        try:
            user = w.users[0]
            reply = agent.enroll(user, {"profile": PROFILE, "password": PASSWORD})
        finally:
            agent.close()
        assert reply.status == 201, (reply.status, reply.body[:300])
        key, cert, _chain = pkcs12.load_key_and_certificates(base64.b64decode(reply.json()["pkcs12"]),
                                                             PASSWORD.encode())
        emails = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert emails.get_values_for_type(x509.RFC822Name) == [user.email]
        assert key.public_key() == cert.public_key()

        trickler.join(GIVE_UP + 5)
        # The server hung up on every slow connection before it had sent what it was trickling, and on
        # every idle one.
        assert [(t.kind, t.sent) for t in trickles if not t.hung_up] == []
        assert [s for s in idle if not server_hung_up(s)] == []
        nonce_reply(kept_alive)  # an agent's kept-alive connection is not taken for an idle one


def test_requests_that_arrive_in_pieces_are_served_whole(world):
    """The worker waits for the whole request before a thread takes it; what it waits for must be
    exactly the request: a body split across writes, a chunked body, two pipelined requests; and what
    the parser refuses is refused at once."""
    w = world
    address = ("127.0.0.1", int(w.platform.url.rsplit(":", 1)[1]))
    context = ssl.create_default_context(cafile=str(w.platform.tls_ca))
    context.load_cert_chain(str(w.platform.agent_cert), str(w.platform.agent_key))

    def exchange(*pieces: bytes, answers: int = 1) -> list[tuple[int, bytes, bytes]]:
        """Send the pieces as separate TLS records, a poll apart; read `answers` replies."""
        with context.wrap_socket(socket.create_connection(address, timeout=AGENT_TIMEOUT),
                                 server_hostname="localhost") as tls:
            for piece in pieces:
                tls.sendall(piece)
                time.sleep(0.2)
            stream = tls.makefile("rb")
            return [read_reply(stream) for _ in range(answers)]

    body = b'{"not": "a JWS"}'
    head = b"POST /api/v1/enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/jose+json\r\n"
    split_body = exchange(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:5], body[5:])
    chunked = exchange(head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body),
                       body + b"\r\n", b"0\r\n\r\n")
    nonce = b"GET /api/v1/nonce HTTP/1.1\r\nHost: localhost\r\n\r\n"
    pipelined = exchange(nonce + nonce[:10], nonce[10:], answers=2)
    # What the parser refuses does not wait for more: a bare LF, a head longer than anyone sends.
    [(bare_lf, _, _)] = exchange(b"GET /health HTTP/1.1\nHost: localhost\n\n")
    [(too_long, _, _)] = exchange(long_head(64 * 1024 + 100))

    # The app read each body whole: the JWS problem document (400), not a timeout or a truncated read.
    for [(status, headers, problem)] in (split_body, chunked):
        assert status == 400, problem
        assert b"application/problem+json" in headers
        assert json.loads(problem)["status"] == 400
    assert [status for status, _, _ in pipelined] == [200, 200]
    assert len({json.loads(reply)["nonce"] for _, _, reply in pipelined}) == 2
    assert (bare_lf, too_long) == (400, 431)


def test_a_kept_alive_connections_next_request_is_served_whole_however_it_arrives(world):
    """After an answer the thread waits a moment (web/worker.py LINGER) for the connection's next
    request and serves it itself when all of it is there; otherwise what arrived goes back to the poller.
    On one kept-alive connection: a next request sent at once, one whose first piece comes at once and
    the rest later (the piece the thread read must reach the poller intact), one sent after the linger,
    then one whose head never ends, which the server closes by the arrival deadline."""
    w = world
    address = ("127.0.0.1", int(w.platform.url.rsplit(":", 1)[1]))
    context = ssl.create_default_context(cafile=str(w.platform.tls_ca))
    context.load_cert_chain(str(w.platform.agent_cert), str(w.platform.agent_key))
    nonce = b"GET /api/v1/nonce HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with context.wrap_socket(socket.create_connection(address, timeout=AGENT_TIMEOUT),
                             server_hostname="localhost") as tls:
        stream = tls.makefile("rb")
        answers = []
        for pieces, pause in (([nonce], 0.0), ([nonce], 0.0), ([nonce[:20], nonce[20:]], 0.3),
                              ([nonce[:5], nonce[5:]], 0.3)):
            time.sleep(pause)  # the first two at once after the answer: the thread's linger serves them
            for i, piece in enumerate(pieces):
                tls.sendall(piece)
                if i + 1 < len(pieces):
                    time.sleep(0.3)  # past the linger: the rest reaches the poller's arrival
            answers.append(read_reply(stream))
        assert [status for status, _, _ in answers] == [200] * 4, answers
        assert len({json.loads(body)["nonce"] for _, _, body in answers}) == 4
        tls.sendall(nonce[:20])  # a head that never ends: closed at the arrival deadline (10 s)
        started = time.monotonic()
        tls.settimeout(GIVE_UP)
        assert stream.read() == b""
        assert 5 < time.monotonic() - started < GIVE_UP


def long_head(size: int) -> bytes:
    """The start of a head of `size` bytes, just over the limit: the server has read all of it when it
    refuses it (so it closes with FIN, not a reset that could beat its answer)."""
    start = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Padding: "
    return start + b"p" * (size - len(start))


def read_reply(stream) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 reply with a Content-Length: status, head, body."""
    status = int(stream.readline().split(b" ", 2)[1])
    head = b""
    while (line := stream.readline()) not in (b"\r\n", b""):
        head += line
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, head.lower(), stream.read(length)
