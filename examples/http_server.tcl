#!/usr/bin/env tclsh
# examples/http_server.tcl -- an HTTP/1.0 responder served by a self-running worker pool.
#
#   tclsh examples/http_server.tcl ?-myaddr 127.0.0.1? ?-port 8080? ?-workers 4?
#                                  ?-maxconnections 1000? ?-timeout 30000? ?-queue 0?
#
# The process binds the port with `::socketserver::socket server` and starts a
# pool with `::socketserver::pool create`: it becomes the pool's monitor and
# serves no connection itself.  The pool forks the workers (no Tclx needed),
# replaces any that dies, retires each one after -maxconnections connections
# and starts a fresh one in its place, and kills a worker that has held one
# connection for more than -timeout ms (0: never).
#
# A worker takes one connection at a time.  This handler is driven by
# fileevents: it reads the request line and headers up to the blank line,
# answers `200 OK` with a body naming the worker's pid, and closes the
# connection; closing it is what tells the pool the worker can take the next
# one.  A client that sends no complete request within 10 s is dropped.
#
# Signals (the pool is created with -signals 1):
#   Ctrl-C (SIGINT) or SIGTERM   stop: no new connections, busy workers finish
#                                (up to 5 s), every worker is reaped, exit 0
#   SIGHUP                       reload: fresh workers start, then the old ones
#                                finish what they hold and exit
#
# `make demo` runs it on 127.0.0.1:8080 with 4 workers.  Use -port 0 for a
# port the kernel chooses (the startup line tells which).

package require Tcl 8.6
package require socketserver

fconfigure stdout -buffering line

proc usage {{why ""}} {
    if {$why ne ""} {puts stderr "http_server: $why"}
    puts stderr "usage: [file tail [info script]] ?-myaddr addr? ?-port port? ?-workers n?\
                 ?-maxconnections n? ?-timeout ms? ?-queue n?"
    exit 2
}

array set opt {
    -myaddr 127.0.0.1 -port 8080 -workers 4 -maxconnections 1000 -timeout 30000 -queue 0
}
if {[llength $argv] % 2} {usage "option without value: [lindex $argv end]"}
foreach {name value} $argv {
    if {![info exists opt($name)]} {usage "unknown option \"$name\""}
    set opt($name) $value
}
if {![string is integer -strict $opt(-workers)] || $opt(-workers) < 1 || $opt(-workers) > 256} {
    usage "-workers must be an integer from 1 to 256"
}

# ---------------------------------------------------------------------------
# The worker's side: the pool calls `app::accept chan ip port` for each
# connection, in the worker process.  Only one connection is open at a time.

namespace eval app {
    variable served 0           ;# requests this worker has answered
    variable request ""         ;# the request line of the current connection
    variable headers 0          ;# headers read so far
    variable timer ""           ;# drops a client that is too slow
    variable readtimeout 10000  ;# ms a client may take to send its request
}

proc app::accept {chan ip port} {
    variable request ""
    variable headers 0
    variable timer
    variable readtimeout
    fconfigure $chan -blocking 0 -buffering full -translation {auto binary}
    set timer [after $readtimeout [namespace code [list finish $chan]]]
    fileevent $chan readable [namespace code [list readable $chan]]
}

# Read the request line and the headers up to the blank line, then answer.
proc app::readable {chan} {
    variable request
    variable headers
    while {1} {
        if {[catch {gets $chan line} n]} {finish $chan; return}  ;# e.g. reset by peer
        if {$n < 0} {
            if {[eof $chan] || [chan pending input $chan] > 8192} {finish $chan}
            return  ;# wait for the rest of the line
        }
        if {$request eq ""} {
            if {$line ne ""} {set request $line}  ;# skip leading blank lines
        } elseif {$line eq ""} {
            respond $chan
            return
        } elseif {[incr headers] > 100} {
            finish $chan   ;# not a request we want
            return
        }
    }
}

# The body has the same length from every worker (the pid is padded), so
# benchmark clients such as `ab` see a fixed-length document.
proc app::respond {chan} {
    variable request
    variable served
    incr served
    set method [lindex [split $request] 0]
    set body [format "hello from socketserver worker %-7d\n" [pid]]
    set head "HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
    append head "Content-Length: [string length $body]\r\n"
    append head "X-Worker-Requests: $served\r\nConnection: close\r\n\r\n"
    if {$method ne "HEAD"} {append head $body}
    catch {puts -nonewline $chan $head}
    finish $chan
}

# Close the connection (a non-blocking close flushes in the background).  The
# pool notices the close and gives this worker its next connection.
proc app::finish {chan} {
    variable timer
    after cancel $timer
    catch {fileevent $chan readable {}}
    catch {close $chan}
}

# ---------------------------------------------------------------------------
# The monitor: bind, start the pool, wait until a signal stops it.

# The pool's log (workers replaced, reloads, stop).  A log command must not
# fail: with stdout gone (a closed terminal or pipe) the message is dropped.
proc log {message} {
    catch {puts "[clock format [clock seconds] -format %T] $message"}
}

if {[catch {
    ::socketserver::socket server -myaddr $opt(-myaddr) -queue $opt(-queue) $opt(-port)
} port]} {
    puts stderr "http_server: $port"
    exit 1
}

if {[catch {
    ::socketserver::pool create -port $port -workers $opt(-workers) \
        -maxconnections $opt(-maxconnections) -timeout $opt(-timeout) \
        -signals 1 -log log app::accept
} pool]} {
    puts stderr "http_server: $pool"
    exit 2
}

set host [expr {[string match *:* $opt(-myaddr)] ? "\[$opt(-myaddr)\]" : $opt(-myaddr)}]
set url http://$host:$port/
set pids [dict keys [dict get [$pool stats] workers]]
puts "serving on $url with [llength $pids] workers (pids [join $pids {, }]),\
      monitor pid [pid] -- try: curl $url"
puts "Ctrl-C stops it; kill -HUP [pid] reloads the workers"

$pool wait

set stats [$pool stats]
log "workers respawned [dict get $stats respawned], recycled [dict get $stats recycled],\
     killed for -timeout [dict get $stats timeouts]; reloads [dict get $stats reloads]"
exit 0
