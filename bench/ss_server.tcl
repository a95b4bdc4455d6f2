# bench/ss_server.tcl -- the "socketserver" configuration: one serving process
# (the listener and the dispatcher thread) and N workers forked with Tclx.
#
#   TCLLIBPATH=.../build tclsh bench/ss_server.tcl ?-workers N? ?-port PORT?
#       ?-queue Q? ?-backlog B? ?-handler sync|fileevent|park?
#       ?-notifier poll|tcl? ?-wait none|data|head? ?-maxparked M?
#       ?-proxy none|v1|v2|any? ?-proxyfrom CIDRS? ?-agent PORT?
#
# Every worker serves bench/http.tcl's answer and re-arms with
# `::socketserver::socket client` when it has finished a connection.
# -handler sync (the default) uses ::bench::accept_sync, blocking reads: a
# worker serves one connection at a time, so this is how its handlers are
# written, and it spares the fileevent wake-ups (each a round trip through Tcl
# 8.6's notifier thread).  -handler fileevent uses ::bench::accept, the
# non-blocking fileevent-driven handler that plain Tcl must use, to show that
# cost.  -handler park uses ::bench::accept_park: HTTP/1.1 keep-alive, the
# connection handed back to the dispatcher after every answer (issue 11).
# -wait, -maxparked, -proxy, -proxyfrom and -agent, when given, go to
# `socket server` as they are (info's agentport, through the control port,
# tells the agent's port).
#
# Output on stdout, one line each:
#   worker PID ctl CTLPORT            once per worker, when it starts
#   port PORT pid PID workers {PID...} ctl CTLPORT ready R
#                                     the serving process, once every worker is
#                                     armed (R = N; fewer if the bounded wait
#                                     ran out), so load can start
# CTLPORT is a private control listener on 127.0.0.1: connect, and the process
# answers one line, "pid PID info {DICT}" with [::socketserver::info PORT], and
# closes.  It is not served through socketserver, so asking does not count as
# a wake-up or a received connection.
#
# Stops when its stdin ends (the driver closes it): the serving process kills
# its workers by pid and reaps them, then exits.  Workers also exit when stdin
# ends.  SIGTERM has its default action.

package require Tclx
package require socketserver
source [file join [file dirname [file normalize [info script]]] http.tcl]

namespace eval ::ss {
    variable port 0
    variable workers {}
    variable handler ::bench::accept_sync
    variable notifier poll
    variable listener {}        ;# this process's control listener
}

# The control listener (::ss::listener): one line of stats per connection.
# Returns its port.
proc ::ss::control {} {
    variable listener [socket -server ::ss::control_accept -myaddr 127.0.0.1 0]
    return [lindex [fconfigure $listener -sockname] 2]
}

proc ::ss::control_accept {chan ip peerport} {
    variable port
    catch {
        fconfigure $chan -blocking 1 -buffering full
        puts $chan [list pid [pid] info [::socketserver::info $port]]
        flush $chan
    }
    catch {close $chan}
}

proc ::ss::worker {} {
    variable port
    variable notifier
    variable listener
    # The serving process's listener: a worker answers on its own (and a listening
    # socket would keep the notifier from switching).
    close $listener
    ::socketserver::notifier $notifier
    set ctl [control]
    puts "worker [pid] ctl $ctl"
    flush stdout
    variable handler
    set ::bench::done [list ::socketserver::socket client -port $port $handler]
    ::bench::watch_stdin [list exit 0]
    {*}$::bench::done
    vwait ::forever
    exit 0
}

# Kill every worker by pid and reap it: SIGTERM, then SIGKILL for those not gone
# within 2 s in all (however many workers there are).
proc ::ss::shutdown {} {
    variable workers
    foreach pid $workers {
        catch {kill SIGTERM $pid}
    }
    set deadline [expr {[clock milliseconds] + 2000}]
    while {[llength $workers] && [clock milliseconds] < $deadline} {
        set workers [lmap pid $workers {
            if {[catch {wait -nohang $pid} r] || [llength $r]} continue
            set pid
        }]
        if {[llength $workers]} {
            after 10
        }
    }
    foreach pid $workers {
        catch {kill SIGKILL $pid}
        catch {wait $pid}
    }
    set workers {}
    set ::forever 1
}

proc ::ss::main {argv} {
    variable port
    variable workers
    variable handler
    variable notifier
    set usage "usage: ss_server.tcl ?-workers N? ?-port PORT? ?-queue Q? ?-backlog B?\
            ?-handler sync|fileevent|park? ?-notifier poll|tcl? ?-wait none|data|head? ?-maxparked M?\
            ?-proxy none|v1|v2|any? ?-proxyfrom CIDRS? ?-agent PORT?"
    array set opt {-workers 2 -port 0 -queue 0 -backlog 128 -handler sync -notifier poll
        -wait {} -maxparked {} -proxy {} -proxyfrom {} -agent {}}
    if {[llength $argv] % 2} {
        error $usage
    }
    foreach {name value} $argv {
        if {![info exists opt($name)]} {
            error $usage
        }
        set opt($name) $value
    }
    switch -- $opt(-handler) {
        sync {set handler ::bench::accept_sync}
        fileevent {set handler ::bench::accept}
        park {set handler ::bench::accept_park}
        default {error $usage}
    }
    if {$opt(-notifier) ni {poll tcl}} {
        error $usage
    }
    set notifier $opt(-notifier)
    set server [list -myaddr 127.0.0.1 -queue $opt(-queue) -backlog $opt(-backlog)]
    foreach name {-wait -maxparked -proxy -proxyfrom -agent} {
        if {$opt($name) ne ""} {
            lappend server $name $opt($name)
        }
    }
    set port [::socketserver::socket server {*}$server $opt(-port)]
    # Each registered worker pins 3 fds in this process, and Tcl 8.6's notifier (select)
    # aborts on an fd of FD_SETSIZE (1024) or more.  So the fds it watches come first: the
    # control listener, and the notifier thread's own pipe, which it makes when it first
    # waits (update).  This process stays on Tcl's notifier, so that -notifier tcl workers
    # inherit it.
    set ctl [control]
    update
    flush stdout
    # Startup is bounded: 5 s and 20 ms per worker.  The driver checks `ready`.
    set deadline [expr {[clock milliseconds] + 5000 + 20 * $opt(-workers)}]
    for {set i 0} {$i < $opt(-workers)} {incr i} {
        # In batches of 8, each once the last has registered: the registration socket
        # queues only net.unix.max_dgram_qlen (default 10) messages, and a worker that
        # finds it full retries every millisecond, for 5 s: hundreds at once starve the
        # dispatcher, and some fail ("connection timed out").
        while {$i % 8 == 0 && [llength [dict get [::socketserver::info $port] workers]] < $i
                && [clock milliseconds] < $deadline} {
            after 1
        }
        set pid [fork]
        if {$pid == 0} {
            set workers {}
            worker
        }
        lappend workers $pid
    }
    # Until every worker is armed.
    while {[set ready [dict get [::socketserver::info $port] ready]] < $opt(-workers)
            && [clock milliseconds] < $deadline} {
        after 10
    }
    puts [list port $port pid [pid] workers $workers ctl $ctl ready $ready]
    flush stdout
    ::bench::watch_stdin ::ss::shutdown
    vwait ::forever
    catch {::socketserver::socket close $port}
}

::ss::main $argv
