"""gunicorn's gthread worker, whose threads only take a request that has fully arrived.

gthread hands every accepted connection to a thread at once; the thread waits up to 5 s for a first byte,
then does the TLS handshake, reads the headers and the body, all blocking and without any deadline. So
8 connections that send nothing hold the 8 threads of 2 workers, and 8 that send one byte a second hold
them for as long as they like: every agent waits. Here the worker's poller (its main thread)
does the handshake and collects the request head and body, non-blocking, with one deadline from the
connection's accept (or from the first byte of a kept-alive connection's next request); a thread gets
the connection with the whole request in its parser's buffer, so it never waits on the network to read
it. The same holds for every request of a kept-alive connection.

A connection that has not sent its whole request by the deadline is closed; when the worker holds
`worker_connections`, the oldest one still arriving (or else the oldest idle kept-alive one) is closed
to make room, so a flood of idle connections cannot keep a new agent out either.

The workers also share the agents' connections evenly (`_Shares`): an agent keeps its connection alive,
so whichever worker won the accept serves all its requests, and the 8 connections of 8 agents fell 6/2
or 5/3 on 2 workers in half the benchmark runs: one process, on one GIL, served most of the load while
the other idled. A worker that holds more connections than another live worker leaves a new one to it
(pausing its own accepts for a moment), unless that worker has not taken it within `ACCEPT_DEFER`.

A thread that has answered a kept-alive connection waits a moment (LINGER, 5 ms) for its next request,
while no other connection waits for a thread, and serves it itself when all of it is there: an agent
sends the next request as soon as it has read the answer, and the way back through the poller cost the
worker's main thread 0.25 ms of CPU and 3 context switches per request. A request not all there by
then goes to the poller with what arrived of it, under the same deadline as any other.

What stays with gunicorn: the parser (this module only decides when a request is there, never what it
means: whatever it cannot tell goes to the parser, which answers it), the thread pool, keep-alive.
HTTP/1.1 only: the server does not offer h2.
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import select
import selectors
import ssl
import struct
import time
from functools import partial

from gunicorn import http, sock
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

_HEAD_END = b"\r\n\r\n"
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
              b"Content-Length: 0\r\n\r\n")


ACCEPT_PAUSE = 0.002  # a worker leaving a connection to a less loaded one looks again after this
ACCEPT_DEFER = 0.1  # and takes it itself if it is still waiting after this
LINGER = 0.005  # a thread that answered waits this long for the connection's next request (see `handle`)


def worker_class(*, body_limit: int, arrival_timeout: float = 10.0) -> type[ArrivalWorker]:
    """The worker with this server's limits: bodies up to `body_limit` bytes (the app's largest) are
    collected before a thread takes them; larger ones go to the app, which refuses them (413). Called in
    the master, before the workers fork: they share the connection counts made here."""
    return type("ArrivalWorker", (ArrivalWorker,), {"body_limit": body_limit,
                                                    "arrival_timeout": arrival_timeout,
                                                    "shares": _Shares()})


class _Shares:
    """How many connections each live worker holds, in memory shared by the master's children (made
    before they fork). Each worker writes only its own slot (chosen by its age, unique per spawn); the
    others read it without a lock: a count read a moment late costs at most one connection of balance."""

    SLOTS = 64
    _SLOT = struct.Struct("qq")  # pid, connections

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, self.SLOTS * self._SLOT.size)
        self._mine: int | None = None

    def claim(self, age: int) -> None:
        self._mine = age % self.SLOTS
        self._SLOT.pack_into(self._memory, self._mine * self._SLOT.size, os.getpid(), 0)

    def release(self) -> None:
        if self._mine is not None:
            self._SLOT.pack_into(self._memory, self._mine * self._SLOT.size, 0, 0)
            self._mine = None

    def publish(self, connections: int) -> None:
        if self._mine is not None:
            struct.pack_into("q", self._memory, self._mine * self._SLOT.size + 8, connections)

    def fewest_elsewhere(self) -> int | None:
        """The fewest connections any other live worker holds (None: there is no other)."""
        fewest = None
        for slot in range(self.SLOTS):
            if slot == self._mine:
                continue
            pid, connections = self._SLOT.unpack_from(self._memory, slot * self._SLOT.size)
            if pid and _alive(pid) and (fewest is None or connections < fewest):
                fewest = connections
        return fewest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Arrival:
    """A connection whose next request has not fully arrived, and what of it has."""

    __slots__ = ("conn", "deadline", "handshaken", "buffer", "events")

    def __init__(self, conn: TConn, deadline: float, handshaken: bool, buffer: bytes) -> None:
        self.conn = conn
        self.deadline = deadline
        self.handshaken = handshaken
        self.buffer = buffer
        self.events = 0  # what the poller watches for it (0: not registered)


class ArrivalWorker(ThreadWorker):
    arrival_timeout = 10.0  # seconds from accept (or first byte) to the whole request, handshake included
    head_limit = 64 * 1024  # a longer head is refused (431) before it reaches a thread
    body_limit = 64 * 1024
    shares: _Shares | None = None  # worker_class() gives one, shared by the workers of one master

    def init_process(self) -> None:
        # Connections still arriving, oldest first: every one gets the same timeout when it starts
        # arriving, so insertion order is deadline order.
        self.arrivals: dict[TConn, _Arrival] = {}
        self.stop_deadline: float | None = None
        # One TLS context per worker (gunicorn builds one per connection: the certificate files are read
        # and parsed again for every handshake).
        self.tls_context = sock.ssl_context(self.cfg) if self.cfg.is_ssl else None
        self.accept_paused_until = 0.0  # leaving new connections to a less loaded worker until then
        self.deferring_since: float | None = None  # since when the connection waiting was left to it
        _raise_open_files_limit(self.worker_connections + 256)
        if self.shares is not None:
            self.shares.claim(self.age)
        try:
            super().init_process()  # runs the worker
        finally:
            if self.shares is not None:
                self.shares.release()

    def handle(self, conn: TConn):
        """gthread's, then, while nothing else waits for a thread, the connection's next request on this
        same thread if it has all arrived within LINGER: an agent sends it as soon as it has read the
        answer, and the way back through the poller (the done-callback, a wake-up of the main thread,
        two epoll_ctl, the poll, the hand-off to a thread) cost more CPU than the short wait
        (PERFORMANCE.md, "The next request on the thread that answered"). A request not all there by then goes back to the
        poller with what has arrived of it, under the same deadline rules as any other."""
        keep = super().handle(conn)
        # (ThreadPoolExecutor's queue of submitted work: empty when no connection waits for a thread)
        while keep is True and self.alive and self.tpool._work_queue.empty():
            arrived = self.linger(conn)
            if arrived is None:
                break
            if not arrived:
                return False  # the peer closed the connection
            keep = super().handle(conn)
        return keep

    def linger(self, conn: TConn) -> bool | None:
        """Wait up to LINGER for the next request: True when all of it is in the parser's buffer, False
        when the peer left, None otherwise (what arrived of it is in the buffer, for the poller)."""
        unreader = conn.parser.unreader
        if unreader.buf.getvalue():
            return None  # read ahead of a body: the poller's path handles it (finish_request)
        sock_ = conn.sock
        sock_.setblocking(False)
        deadline = time.monotonic() + LINGER
        buffer = b""
        poller = None
        try:
            while True:
                try:
                    data = sock_.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    if poller is None:
                        poller = select.poll()
                        poller.register(sock_.fileno(), select.POLLIN)
                    if not poller.poll(left * 1000):
                        return None
                    continue
                if not data:
                    return False
                buffer += data
                if self.request_arrived(buffer):
                    return True
        except (_HeadTooLarge, ssl.SSLWantWriteError):
            return None  # the poller answers it (431), or waits until it may write
        except (OSError, ValueError):  # a reset, a TLS alert
            return False
        finally:
            if buffer:
                unreader.unread(buffer)

    def set_accept_enabled(self, enabled: bool) -> None:
        # gthread's loop turns accepting back on at every turn: not while a pause lasts
        super().set_accept_enabled(enabled and time.monotonic() >= self.accept_paused_until)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.accept_paused_until:
            left = self.accept_paused_until - time.monotonic()
            if left > 0:
                timeout = min(timeout, left)  # wake when the pause ends: accepting resumes next turn
            else:
                self.accept_paused_until = 0.0
        super().wait_for_and_dispatch_events(timeout)

    def leave_to_another(self) -> bool:
        """Whether to leave the connection waiting on the listener to a worker holding fewer: for at most
        ACCEPT_DEFER (it may be busy, or stuck), after which this one takes it."""
        fewest = self.shares.fewest_elsewhere() if self.shares is not None else None
        now = time.monotonic()
        if fewest is None or self.nr_conns <= fewest:
            self.deferring_since = None
            return False
        if self.deferring_since is None or now - self.deferring_since > 1.0:  # a new connection waiting
            self.deferring_since = now
        if now - self.deferring_since >= ACCEPT_DEFER:
            self.deferring_since = None
            return False
        self.accept_paused_until = now + ACCEPT_PAUSE
        self.set_accept_enabled(False)
        return True

    def accept(self, listener) -> None:
        if self.leave_to_another():
            return
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.evict_oldest()
            elif exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())  # non-blocking from here
        if self.tls_context is not None:
            try:
                conn.sock = self.tls_context.wrap_socket(conn.sock, server_side=True,
                                                         do_handshake_on_connect=False,
                                                         suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
            except OSError:  # the peer is already gone
                self.nr_conns -= 1
                conn.close()
                return
        self.enqueue_req(conn)
        if self.nr_conns >= self.worker_connections:
            self.evict_oldest()
        if self.shares is not None:
            self.shares.publish(self.nr_conns)

    def enqueue_req(self, conn: TConn) -> None:
        """gthread calls this for a new connection, a kept-alive one that became readable, and one whose
        next request is already partly buffered: in every case, wait until the request is all here."""
        conn.sock.setblocking(False)  # a thread may hand back a connection with the next request begun
        buffered = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        arrival = _Arrival(conn, time.monotonic() + self.arrival_timeout,
                           handshaken=conn.initialized or self.tls_context is None, buffer=buffered)
        self.arrivals[conn] = arrival
        self.advance(arrival)

    def advance(self, arrival: _Arrival, _fileobj=None) -> None:
        """One step, whenever the socket is ready: handshake, then read until the request is complete."""
        conn = arrival.conn
        try:
            if not arrival.handshaken:
                conn.sock.do_handshake()
                arrival.handshaken = True
            while not self.request_arrived(arrival.buffer):
                data = conn.sock.recv(65536)
                if not data:  # the peer left before it finished a request
                    self.drop(arrival)
                    return
                arrival.buffer += data
        except ssl.SSLWantWriteError:
            self.watch(arrival, selectors.EVENT_WRITE)
            return
        except (ssl.SSLWantReadError, BlockingIOError):
            self.watch(arrival, selectors.EVENT_READ)
            return
        except _HeadTooLarge:
            try:
                conn.sock.send(_TOO_LARGE)
            except OSError:
                pass
            self.drop(arrival)
            return
        except (OSError, ValueError):  # a failed handshake (ssl.SSLError is an OSError), a reset
            self.drop(arrival)
            return
        self.hand_to_thread(arrival)

    def request_arrived(self, buffer: bytes) -> bool:
        return request_arrived(buffer, self.head_limit, self.body_limit)

    def watch(self, arrival: _Arrival, events: int) -> None:
        callback = partial(self.advance, arrival)
        if not arrival.events:
            self.poller.register(arrival.conn.sock, events, callback)
        elif arrival.events != events:
            self.poller.modify(arrival.conn.sock, events, callback)
        arrival.events = events

    def forget(self, arrival: _Arrival) -> None:
        del self.arrivals[arrival.conn]
        if arrival.events:
            self.poller.unregister(arrival.conn.sock)
            arrival.events = 0

    def drop(self, arrival: _Arrival) -> None:
        self.forget(arrival)
        self.nr_conns -= 1
        arrival.conn.close()

    def hand_to_thread(self, arrival: _Arrival) -> None:
        self.forget(arrival)
        conn = arrival.conn
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.initialized = True  # TConn.init would wrap and handshake again
        conn.parser.unreader.unread(arrival.buffer)
        super().enqueue_req(conn)

    def evict_oldest(self) -> None:
        """Room for one more connection: the one that has been arriving longest, or else the longest idle
        kept-alive one (its agent reconnects)."""
        if self.arrivals:
            self.drop(next(iter(self.arrivals.values())))
        elif self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            self.poller.unregister(conn.sock)
            self.nr_conns -= 1
            conn.close()

    def murder_pending(self) -> None:
        """Called by gthread's loop after every poll: close what missed its deadline (when the worker
        stops, a request that has not arrived gets what a kept-alive connection gets: a short linger)."""
        super().murder_pending()
        if self.shares is not None:
            if self.alive:
                self.shares.publish(self.nr_conns)  # connections closed since the last turn
            else:
                self.shares.release()  # stopping: it takes no more connections, leave none to it
        now = time.monotonic()
        if not self.alive and self.stop_deadline is None:
            self.stop_deadline = now + STOP_KEEPALIVE_LINGER
        while self.arrivals:
            arrival = next(iter(self.arrivals.values()))
            if min(arrival.deadline, self.stop_deadline or arrival.deadline) > now:
                break
            self.drop(arrival)


class _HeadTooLarge(Exception):
    pass


def request_arrived(buffer: bytes, head_limit: int, body_limit: int) -> bool:
    """Whether `buffer` holds a whole HTTP/1.1 request (head, and a body of up to `body_limit` bytes), or
    something the parser refuses without reading more. Only a readiness test: gunicorn's parser decides
    what the bytes mean, so anything unusual counts as arrived and goes to it. `Expect: 100-continue`
    changes nothing: its body is awaited too (a client sends it after a short wait, RFC 9110 10.1.1)."""
    end = buffer.find(_HEAD_END)
    head = buffer if end < 0 else buffer[:end]
    if head.count(b"\n") != head.count(b"\r\n"):
        return True  # bare LF: the parser refuses it at once
    if end < 0:
        if len(buffer) > head_limit:
            raise _HeadTooLarge
        return False
    body = buffer[end + len(_HEAD_END):]
    length, chunked = None, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            if length is not None or not value.strip().isdigit():
                return True  # two lengths or a bad one: refused by the parser
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.strip().lower() == b"chunked"
            if not chunked:
                return True
    if chunked:
        return len(body) > body_limit or _last_chunk_arrived(body)
    if length is None or length > body_limit:
        return True  # no body; or too large, which the app refuses from the header alone
    return len(body) >= length


def _last_chunk_arrived(body: bytes) -> bool:
    position = 0
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            return False
        try:
            size = int(body[position:line_end].split(b";", 1)[0].strip(), 16)
        except ValueError:
            return True  # not a chunk size: the parser refuses it
        if size == 0:
            trailers = body[line_end + 2:]
            return trailers.startswith(b"\r\n") or _HEAD_END in trailers
        position = line_end + 2 + size + 2
        if position > len(body):
            return False


def _raise_open_files_limit(wanted: int) -> None:
    """Every connection is a file descriptor: let the worker hold `worker_connections` of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        allowed = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
