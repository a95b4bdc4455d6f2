#!/usr/bin/env python3
"""examples/worker.py -- a socketserver worker in plain Python 3 (3.9+, standard library only).

It is not forked by the serving process: it connects to the server's registration path
(`::socketserver::socket server -path P`), registers with wire protocol v1 (doc/protocol.md) and
then receives the accepted TCP connections themselves, one at a time, and serves HTTP/1.1 as
examples/http_server.tcl does:

    GET|HEAD /    200, "hello from socketserver worker PID" (fixed length)
    any  /echo    200, the request's body
    otherwise     404; a malformed request gets 400, 413, 431 or 501 and the connection is closed

Keep-alive (HTTP/1.1 unless the client sent `Connection: close`; HTTP/1.0 only with
`Connection: keep-alive`): after a response the connection is handed back to the dispatcher,
which parks it until the client sends its next request (any worker then serves it), unless that
request has already been read (pipelined): this worker then serves it in place.

usage: worker.py [--path P] [--maxconnections N] [--headertimeout MS] [--maxbody BYTES]

  --path            the registration path (default: $SOCKETSERVER_PATH)
  --maxconnections  exit 0 after N deliveries (default: $SOCKETSERVER_MAXCONNECTIONS, else 0: never)
  --headertimeout   a client has this many ms to send a whole request, and to take a response
                    (default 10000)
  --maxbody         the largest request body, in bytes (default 1048576)

SIGTERM or SIGINT: finish the current connection, exit 0.  The server closing: exit 0.
Exit status: 0 done; 1 failed (no server at the path, no answer, a protocol error);
2 refused by the dispatcher (the reason is printed); 64 bad usage.
"""

import argparse
import os
import re
import select
import signal
import socket
import struct
import sys
import time

# ---------------------------------------------------------------------------
# The wire (doc/protocol.md): pure encode and decode, no sockets.

VERSION = 1
REGISTER_TIMEOUT = 5.0   # s: to connect, to send the registration, and for the answer
HANDBACK_TIMEOUT = 5.0   # s: for room in the mailbox (the dispatcher reads it at once)
MAX_MESSAGE = 64         # longer than any message, so that a long one shows as malformed

REFUSALS = {
    1: "worker limit reached ({value} workers)",
    2: "the serving process is out of file descriptors",
    3: "invalid registration",
    4: "protocol version {version} is not supported (the server speaks version {value})",
    5: "not permitted: this user or group may not register",
}


def encode_registration(pid):
    return struct.pack("<cBi", b"W", VERSION, pid)


def encode_ready(asked_ns):
    return struct.pack("<cQ", b"R", asked_ns)


def encode_handback(peer):
    """peer: the bytes of the delivery that brought the connection (see decode_peer)."""
    return b"P" + peer


def decode_answer(msg):
    """("accepted", port) or ("refused", reason, value); None if malformed."""
    if len(msg) == 4 and msg[:2] == bytes([ord("A"), VERSION]):
        return ("accepted", struct.unpack(">H", msg[2:])[0])
    if len(msg) == 6 and msg[:1] == b"N":
        reason, value = struct.unpack("<BI", msg[1:])
        return ("refused", reason, value)
    return None


def refusal_message(reason, value):
    text = REFUSALS.get(reason, "refused for an unknown reason ({reason})")
    return text.format(reason=reason, value=value, version=VERSION)


def decode_peer(msg):
    """(ip, port) of a delivery: family:u8 (4|6) port:u16 BE address; None if malformed."""
    families = {(4, 7): socket.AF_INET, (6, 19): socket.AF_INET6}
    family = families.get((msg[0], len(msg))) if msg else None
    if family is None:
        return None
    return (socket.inet_ntop(family, msg[3:]), struct.unpack(">H", msg[1:3])[0])


# ---------------------------------------------------------------------------
# Registering, waiting for connections, handing them back.

class Refused(Exception):
    """The dispatcher answered, and said no."""


class ProtocolError(Exception):
    """The dispatcher sent something this worker does not understand."""


def seqpacket_pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def register(path):
    """Registers at path. Returns (link, mailbox, port); raises Refused, ProtocolError, OSError."""
    link, dispatcher_link = seqpacket_pair()
    mailbox, dispatcher_mailbox = seqpacket_pair()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as registration:
            registration.settimeout(REGISTER_TIMEOUT)
            registration.connect(path)
            fds = [dispatcher_link.fileno(), dispatcher_mailbox.fileno(), mailbox.fileno()]
            socket.send_fds(registration, [encode_registration(os.getpid())], fds)
            # Our copies of the dispatcher's ends must go, or its closing them would not show.
            dispatcher_link.close()
            dispatcher_mailbox.close()
            link.settimeout(REGISTER_TIMEOUT)
            answer = link.recv(MAX_MESSAGE)
            link.settimeout(None)
        if not answer:
            raise ConnectionResetError("the server closed the registration without an answer")
        decoded = decode_answer(answer)
        if decoded is None:
            raise ProtocolError("malformed answer {!r}".format(answer))
        if decoded[0] == "refused":
            raise Refused(refusal_message(*decoded[1:]))
        return link, mailbox, decoded[1]
    except BaseException:
        for sock in (link, mailbox, dispatcher_link, dispatcher_mailbox):
            sock.close()
        raise


def send_ready(link):
    """Asks for one connection. False if the server has gone."""
    try:
        link.send(encode_ready(time.monotonic_ns()))
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def wait_for_delivery(link, mailbox, stop):
    """The next connection: (socket, peer bytes, (ip, port)), or None to leave (a signal, the
    server closed, or this worker was dropped). A stop wins over a connection waiting in the
    mailbox: that one goes back to the dispatcher when we exit."""
    poller = select.poll()
    for fd in (stop.fileno(), link.fileno(), mailbox.fileno()):
        poller.register(fd, select.POLLIN)
    while True:
        ready = dict(poller.poll())
        if stop.check() or link.fileno() in ready:
            return None  # the link says nothing after the answer: this is its end
        if mailbox.fileno() in ready:
            return receive_delivery(mailbox)


def receive_delivery(mailbox):
    msg, fds, flags, _ = socket.recv_fds(mailbox, MAX_MESSAGE, 2, socket.MSG_CMSG_CLOEXEC)
    if not msg and not fds:
        return None  # EOF: the server closed
    peer = decode_peer(msg)
    if peer is None or len(fds) != 1 or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("malformed delivery {!r} with {} fds".format(msg, len(fds)))
    return socket.socket(fileno=fds[0]), msg, peer


def hand_back(mailbox, conn, peer):
    """Gives a kept-alive connection back to the dispatcher, which parks it until the client
    sends more. False if it could not (the caller then closes it)."""
    try:
        # O_NONBLOCK is shared by every copy of the fd (settimeout sets it): the connection
        # travels blocking, as an accepted one does.
        conn.settimeout(None)
        mailbox.settimeout(HANDBACK_TIMEOUT)
        socket.send_fds(mailbox, [encode_handback(peer)], [conn.fileno()])
        return True
    except OSError:
        return False
    finally:
        mailbox.settimeout(None)


class Stop:
    """SIGTERM and SIGINT: the worker finishes its connection and leaves. The signals also wake
    a poll through a pipe (signal.set_wakeup_fd)."""

    def __init__(self):
        self.requested = False
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def fileno(self):
        return self._read

    def check(self):
        try:
            while os.read(self._read, 64):
                pass
        except BlockingIOError:
            pass
        return self.requested


# ---------------------------------------------------------------------------
# HTTP/1.1, as examples/http_server.tcl serves it.

LINE_LIMIT = 8192
HEADER_LIMIT = 100
REQUEST_LINE = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/(1\.[01])$")
HEADER_LINE = re.compile(r"^([^:\s]+):\s*(.*?)\s*$")
REASONS = {400: "Bad Request", 413: "Content Too Large",
           431: "Request Header Fields Too Large", 501: "Not Implemented"}


class Rejected(Exception):
    """A request that gets an error status, after which the connection is closed."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class ClientGone(Exception):
    """The client closed, or was too slow: the connection is closed without an answer."""


class Request:
    def __init__(self, method, target, version):
        self.method, self.target, self.version = method, target, version
        self.headers = {}  # lower-case name -> list of values
        self.body = b""

    def header(self, name):
        return self.headers.get(name, [])


def fill(conn, buf, deadline):
    """Reads more of the request into buf, by the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ClientGone("timeout")
    conn.settimeout(left)
    try:
        data = conn.recv(65536)
    except (OSError, TimeoutError) as err:
        raise ClientGone(str(err)) from None
    if not data:
        raise ClientGone("eof")
    buf += data


def read_line(conn, buf, deadline):
    while True:
        end = buf.find(b"\n")
        if end > LINE_LIMIT or (end < 0 and len(buf) > LINE_LIMIT):
            raise Rejected(431)
        if end >= 0:
            line = bytes(buf[:end]).rstrip(b"\r")
            del buf[:end + 1]
            return line.decode("latin-1")
        fill(conn, buf, deadline)


def read_request(conn, buf, deadline, maxbody):
    """One request from buf and conn. What follows it stays in buf (a pipelined request)."""
    line = ""
    while line == "":  # blank lines before a request are ignored
        line = read_line(conn, buf, deadline)
    match = REQUEST_LINE.match(line)
    if not match:
        raise Rejected(400)
    request = Request(*match.groups())
    count = 0
    while True:
        line = read_line(conn, buf, deadline)
        if line == "":
            break
        count += 1
        if count > HEADER_LIMIT:
            raise Rejected(431)
        match = HEADER_LINE.match(line)
        if not match:
            raise Rejected(400)
        request.headers.setdefault(match.group(1).lower(), []).append(match.group(2))
    length = body_length(request, maxbody)
    if length and request.version == "1.1" and [v.lower() for v in request.header("expect")] == ["100-continue"]:
        send(conn, b"HTTP/1.1 100 Continue\r\n\r\n", deadline)
    while len(buf) < length:
        fill(conn, buf, deadline)
    request.body = bytes(buf[:length])
    del buf[:length]
    return request


def body_length(request, maxbody):
    if request.version == "1.1" and not request.header("host"):
        raise Rejected(400)  # RFC 9112: a 1.1 request must name its host
    if request.header("transfer-encoding"):
        raise Rejected(501)  # no chunked bodies: the message's end is unknown
    lengths = set(request.header("content-length"))
    if not lengths:
        return 0
    if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,15}", next(iter(lengths))):
        raise Rejected(400)
    length = int(lengths.pop())
    if length > maxbody:
        raise Rejected(413)
    return length


def keeps_alive(request):
    tokens = {t.strip().lower() for v in request.header("connection") for t in v.split(",")}
    if request.version == "1.1":
        return "close" not in tokens
    return "keep-alive" in tokens  # HTTP/1.0 keep-alive is opt-in


def response(request, served, keep):
    """The bytes answering request; served counts the requests this worker has answered."""
    path = request.target.split("?", 1)[0]
    status = "200 OK"
    if path == "/echo":
        body = request.body
    elif path == "/" and request.method in ("GET", "HEAD"):
        # The same length from every worker (the pid is padded), as benchmark clients expect.
        body = "hello from socketserver worker {:<7d}\n".format(os.getpid()).encode()
    else:
        status = "404 Not Found"
        body = "not found: {}\n".format(path).encode("latin-1")
    head = "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\n".format(status)
    head += "Content-Length: {}\r\nX-Worker-Requests: {}\r\n".format(len(body), served)
    if not keep:
        head += "Connection: close\r\n"
    elif request.version == "1.0":
        head += "Connection: keep-alive\r\n"
    head = (head + "\r\n").encode("latin-1")
    return head if request.method == "HEAD" else head + body


def rejection(status):
    body = "{} {}\n".format(status, REASONS[status])
    return ("HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n"
            "Connection: close\r\n\r\n{}").format(status, REASONS[status], len(body), body).encode()


def send(conn, data, deadline):
    conn.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        conn.sendall(data)
    except (OSError, TimeoutError) as err:
        raise ClientGone(str(err)) from None


class Server:
    """This worker's connections: reads requests, answers them, hands kept-alive connections
    back."""

    def __init__(self, mailbox, stop, headertimeout, maxbody):
        self.mailbox, self.stop = mailbox, stop
        self.headertimeout, self.maxbody = headertimeout, maxbody
        self.served = 0

    def serve(self, conn, peer):
        """Serves one delivered connection until it is closed or handed back."""
        buf = bytearray()
        with conn:
            try:
                while True:
                    deadline = time.monotonic() + self.headertimeout
                    request = read_request(conn, buf, deadline, self.maxbody)
                    self.served += 1
                    # Stopping, a pipelined request is not served here: the client sends it again.
                    keep = keeps_alive(request) and not (self.stop.requested and buf)
                    send(conn, response(request, self.served, keep),
                         time.monotonic() + self.headertimeout)
                    if not keep:
                        return
                    if buf:
                        continue  # the next request is here already: serve it in place
                    # Handed back or not (then the response is sent and the connection ends),
                    # our copy closes as we leave the with.
                    hand_back(self.mailbox, conn, peer)
                    return
            except Rejected as err:
                try:
                    send(conn, rejection(err.status), time.monotonic() + self.headertimeout)
                except ClientGone:
                    pass
            except ClientGone:
                pass


# ---------------------------------------------------------------------------
# Main

def parse_args(argv):
    def env_int(name):
        value = os.environ.get(name, "0") or "0"
        return int(value) if value.isdigit() else -1

    parser = argparse.ArgumentParser(prog="worker.py", description="A socketserver worker that serves HTTP/1.1.")
    parser.add_argument("--path", default=os.environ.get("SOCKETSERVER_PATH"),
                        help="the registration path (default: $SOCKETSERVER_PATH)")
    parser.add_argument("--maxconnections", type=int, default=env_int("SOCKETSERVER_MAXCONNECTIONS"),
                        help="exit 0 after this many deliveries (0: never)")
    parser.add_argument("--headertimeout", type=int, default=10000,
                        help="ms a client has to send a whole request, and to take a response")
    parser.add_argument("--maxbody", type=int, default=1048576, help="the largest request body in bytes")
    parser.error = lambda message: parser.exit(64, "worker.py: {}\n".format(message))
    args = parser.parse_args(argv)
    if not args.path:
        parser.error("no registration path: give --path or set SOCKETSERVER_PATH")
    if args.maxconnections < 0:
        parser.error("--maxconnections (or $SOCKETSERVER_MAXCONNECTIONS) must be a non-negative integer")
    if args.headertimeout <= 0 or args.maxbody < 0:
        parser.error("--headertimeout must be positive and --maxbody non-negative")
    return args


def main(argv):
    args = parse_args(argv)
    stop = Stop()
    try:
        link, mailbox, port = register(args.path)
    except Refused as err:
        print("worker.py: refused by the server at {}: {}".format(args.path, err), file=sys.stderr)
        return 2
    except (OSError, ProtocolError) as err:
        print("worker.py: cannot register at {}: {}".format(args.path, err), file=sys.stderr)
        return 1
    print("worker {} registered at {} (port {})".format(os.getpid(), args.path, port), flush=True)
    server = Server(mailbox, stop, args.headertimeout / 1000, args.maxbody)
    delivered = 0
    try:
        while not stop.requested and (args.maxconnections == 0 or delivered < args.maxconnections):
            if not send_ready(link):
                break
            delivery = wait_for_delivery(link, mailbox, stop)
            if delivery is None:
                break
            delivered += 1
            server.serve(delivery[0], delivery[1])
    except ProtocolError as err:
        print("worker.py: {}".format(err), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
