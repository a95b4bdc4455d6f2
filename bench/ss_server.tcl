# bench/ss_server.tcl -- the "socketserver" configuration: one serving process
# (the listener and the dispatcher thread) and N workers, forked with Tclx or
# started as programs of their own that register through a named socket.
#
#   TCLLIBPATH=.../build tclsh bench/ss_server.tcl ?-workers N? ?-port PORT?
#       ?-queue Q? ?-backlog B? ?-handler sync|fileevent|park?
#       ?-notifier poll|tcl? ?-wait none|data|head? ?-maxparked M?
#       ?-proxy none|v1|v2|any? ?-proxyfrom CIDRS? ?-agent PORT?
#       ?-path PATH? ?-spawn fork|exec|python?
#   TCLLIBPATH=.../build tclsh bench/ss_server.tcl -worker PATH
#       ?-handler H? ?-notifier N?
#
# -spawn says what the workers are (issue 13):
#   fork    (the default) children forked with Tclx: the serving process's copy.
#   exec    separate tclsh processes running this script with -worker PATH:
#           forked and exec'd (execl), so the serving process still reaps them,
#           but nothing of its state survives the exec; each registers with
#           `::socketserver::socket client -path PATH` and then serves exactly
#           as a forked worker does (same handler, same re-arming).
#   python  examples/worker.py --path PATH, forked and exec'd the same way.
#           Its answer is not bench/http.tcl's: HTTP/1.1 with a 39-byte body
#           "hello from socketserver worker PID", an X-Worker-Requests header,
#           and 404 for /slow (it has no slow path).  Its stdout (a line when
#           it registers) goes to /dev/null, its stderr is the server's.
# exec and python need -path, the named registration socket (`socket server
# -path`), which the server removes when it exits.
#
# Every Tcl worker serves bench/http.tcl's answer and re-arms with
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
#   worker PID ctl CTLPORT            once per Tcl worker, when it starts
#   port PORT pid PID workers {PID...} ctl CTLPORT ready R
#                                     the serving process, once every worker is
#                                     registered and armed (R = N; fewer if
#                                     the bounded wait ran out), so load can
#                                     start.  workers are the pids started,
#                                     which are those that registered.
# CTLPORT is a private control listener on 127.0.0.1: connect, and the process
# answers one line, "pid PID info {DICT}" with [::socketserver::info PORT], and
# closes.  It is not served through socketserver, so asking does not count as
# a wake-up or a received connection.
#
# Stops when its stdin ends (the driver closes it): the serving process kills
# its workers by pid and reaps them, then exits.  Tcl workers also exit when
# stdin ends, Python's when the server goes.  SIGTERM has its default action
# (Python's worker: finish the connection, exit).

package require Tclx
package require socketserver
source [file join [file dirname [file normalize [info script]]] http.tcl]

namespace eval ::ss {
    variable port 0
    variable workers {}
    variable handler ::bench::accept_sync
    variable notifier poll
    variable workeropts {}      ;# an exec'd Tcl worker's -handler and -notifier
    variable listener {}        ;# this process's control listener
    variable here [file dirname [file normalize [info script]]]
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

# A Tcl worker: serves connections from the server at TARGET, `client`'s
# {-port PORT} (forked) or {-path PATH} (exec'd), until its stdin ends.
proc ::ss::worker {target} {
    variable port
    variable notifier
    variable listener
    variable handler
    # A forked worker has the serving process's listener: it answers on its own
    # (and a listening socket would keep the notifier from switching).
    if {$listener ne ""} {
        close $listener
    }
    ::socketserver::notifier $notifier
    set ctl [control]
    puts "worker [pid] ctl $ctl"
    flush stdout
    set ::bench::done [list ::socketserver::socket client {*}$target $handler]
    ::bench::watch_stdin [list exit 0]
    {*}$::bench::done
    if {$port == 0} {
        # Registered by path: the server's port is known now (the control port's info).
        set port [dict get [::socketserver::info] port]
    }
    vwait ::forever
    exit 0
}

# Start one worker of KIND (see -spawn) for the server on PORT with -path
# PATH; returns its pid.  exec and python: forked, then execl, so that this
# process is their parent and reaps them as it does forked ones.
proc ::ss::spawn {kind path} {
    variable port
    variable here
    variable workeropts
    variable workers
    set pid [fork]
    if {$pid != 0} {
        return $pid
    }
    set workers {}
    switch -- $kind {
        fork {
            worker [list -port $port]
        }
        exec {
            set program [info nameofexecutable]
            set args [list [file join $here ss_server.tcl] -worker $path {*}$workeropts]
        }
        python {
            set program [lindex [auto_execok python3] 0]
            set args [list [file join [file dirname $here] examples worker.py] --path $path]
            dup [open /dev/null w] stdout
        }
    }
    catch {execl $program $args} msg
    puts stderr "ss_server.tcl: cannot start a $kind worker: $msg"
    exit 127
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
    variable workeropts
    set usage "usage: ss_server.tcl ?-workers N? ?-port PORT? ?-queue Q? ?-backlog B?\
            ?-handler sync|fileevent|park? ?-notifier poll|tcl? ?-wait none|data|head? ?-maxparked M?\
            ?-proxy none|v1|v2|any? ?-proxyfrom CIDRS? ?-agent PORT? ?-path PATH?\
            ?-spawn fork|exec|python?, or: ss_server.tcl -worker PATH ?-handler H? ?-notifier N?"
    array set opt {-workers 2 -port 0 -queue 0 -backlog 128 -handler sync -notifier poll
        -wait {} -maxparked {} -proxy {} -proxyfrom {} -agent {} -path {} -spawn fork -worker {}}
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
    if {$opt(-worker) ne ""} {
        worker [list -path $opt(-worker)]
    }
    if {$opt(-spawn) ni {fork exec python} || ($opt(-spawn) ne "fork" && $opt(-path) eq "")} {
        error $usage
    }
    set workeropts [list -handler $opt(-handler) -notifier $opt(-notifier)]
    set server [list -myaddr 127.0.0.1 -queue $opt(-queue) -backlog $opt(-backlog)]
    foreach name {-wait -maxparked -proxy -proxyfrom -agent -path} {
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
        lappend workers [spawn $opt(-spawn) $opt(-path)]
    }
    # Until every worker started has registered (the pids the server knows are
    # those it was told: an exec'd worker's must be the one started), and all
    # are armed.
    while {1} {
        set info [::socketserver::info $port]
        set ready [dict get $info ready]
        set missing [lmap pid $workers {
            if {$pid in [dict get $info workers]} continue
            set pid
        }]
        if {($ready >= $opt(-workers) && ![llength $missing]) || [clock milliseconds] >= $deadline} {
            break
        }
        after 10
    }
    puts [list port $port pid [pid] workers $workers ctl $ctl ready $ready]
    flush stdout
    ::bench::watch_stdin ::ss::shutdown
    vwait ::forever
    catch {::socketserver::socket close $port}
}

::ss::main $argv
