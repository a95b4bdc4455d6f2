# bench/ss_server.tcl -- the "socketserver" configuration: one serving process
# (the listener and the dispatcher thread) and N workers forked with Tclx.
#
#   TCLLIBPATH=.../build tclsh bench/ss_server.tcl ?-workers N? ?-port PORT?
#       ?-queue Q? ?-handler sync|fileevent?
#
# Every worker serves bench/http.tcl's answer and re-arms with
# `::socketserver::socket client` when it has finished a connection.
# -handler sync (the default) uses ::bench::accept_sync, blocking reads: a
# worker serves one connection at a time, so this is how its handlers are
# written, and it spares the fileevent wake-ups (each a round trip through Tcl
# 8.6's notifier thread).  -handler fileevent uses ::bench::accept, the
# non-blocking fileevent-driven handler that plain Tcl must use, to show that
# cost.
#
# Output on stdout, one line each:
#   worker PID ctl CTLPORT            once per worker, when it starts
#   port PORT pid PID workers {PID...} ctl CTLPORT
#                                     the serving process, once every worker is
#                                     armed (ready = N), so load can start
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
}

# The control listener: one line of stats per connection.
proc ::ss::control {} {
    set listener [socket -server ::ss::control_accept -myaddr 127.0.0.1 0]
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

# Kill every worker by pid and reap it; every wait is bounded.
proc ::ss::shutdown {} {
    variable workers
    foreach pid $workers {
        catch {kill SIGTERM $pid}
    }
    foreach pid $workers {
        set reaped 0
        for {set i 0} {$i < 100 && !$reaped} {incr i} {
            if {[catch {wait -nohang $pid} r] || [llength $r]} {
                set reaped 1
            } else {
                after 10
            }
        }
        if {!$reaped} {
            catch {kill SIGKILL $pid}
            catch {wait $pid}
        }
    }
    set workers {}
    set ::forever 1
}

proc ::ss::main {argv} {
    variable port
    variable workers
    variable handler
    variable notifier
    set usage "usage: ss_server.tcl ?-workers N? ?-port PORT? ?-queue Q? ?-handler sync|fileevent? ?-notifier poll|tcl?"
    array set opt {-workers 2 -port 0 -queue 0 -handler sync -notifier poll}
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
        default {error $usage}
    }
    if {$opt(-notifier) ni {poll tcl}} {
        error $usage
    }
    set notifier $opt(-notifier)
    set port [::socketserver::socket server -myaddr 127.0.0.1 -queue $opt(-queue) $opt(-port)]
    flush stdout
    for {set i 0} {$i < $opt(-workers)} {incr i} {
        set pid [fork]
        if {$pid == 0} {
            set workers {}
            worker
        }
        lappend workers $pid
    }
    # Wait (bounded: 10 s) until every worker is armed.
    for {set i 0} {$i < 1000} {incr i} {
        if {[dict get [::socketserver::info $port] ready] >= $opt(-workers)} {
            break
        }
        after 10
    }
    set ctl [control]
    puts [list port $port pid [pid] workers $workers ctl $ctl]
    flush stdout
    ::bench::watch_stdin ::ss::shutdown
    vwait ::forever
    catch {::socketserver::socket close $port}
}

::ss::main $argv
