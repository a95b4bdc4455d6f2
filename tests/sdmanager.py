#!/usr/bin/env python3
"""tests/sdmanager.py -- a minimal service manager for activate.test.

It does what systemd does for a socket-activated service that is restarted:
it owns a listening socket on 127.0.0.1 (port chosen by the kernel) and
starts the service with that socket as fd 3 and LISTEN_PID, LISTEN_FDS and
LISTEN_FDNAMES set (sd_listen_fds(3)), stops it with SIGTERM, and starts the
next one, while connections keep queueing in the socket's backlog.
(systemd-socket-activate runs its child only once.)

    sdmanager.py LOGFILE NAME COMMAND ARG...

Prints "port N".  Then reads commands on stdin, one a line, and answers each
with one line:
    start        -> "started PID"
    stop PID     -> "stopped PID exit CODE" | "stopped PID signal N"
                    (SIGTERM, then SIGKILL after 10 s)
At the end of stdin it kills (SIGKILL) and reaps every child still running.
The children's stdout and stderr go to LOGFILE.
"""
import os
import signal
import socket
import sys
import time

logfile, name, command = sys.argv[1], sys.argv[2], sys.argv[3:]
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0))
listener.listen(128)
print("port", listener.getsockname()[1], flush=True)
log = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
children = set()


def start():
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.dup2(listener.fileno(), 3)
            os.set_inheritable(3, True)  # dup2 onto itself leaves it close-on-exec
            os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES=name)
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    children.add(pid)
    return "started %d" % pid


def stop(pid):
    if pid not in children:
        return "error not a child %d" % pid
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            done, status = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    children.discard(pid)
    if os.WIFEXITED(status):
        return "stopped %d exit %d" % (pid, os.WEXITSTATUS(status))
    return "stopped %d signal %d" % (pid, os.WTERMSIG(status))


for line in sys.stdin:
    words = line.split()
    if words == ["start"]:
        print(start(), flush=True)
    elif len(words) == 2 and words[0] == "stop" and words[1].isdigit():
        print(stop(int(words[1])), flush=True)
    else:
        print("error bad command", flush=True)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
