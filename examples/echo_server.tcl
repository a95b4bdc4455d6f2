#!/usr/bin/env tclsh
# examples/echo_server.tcl -- N pre-forked workers echoing lines on one port,
# after the example that came with socketservtcl.
#
#   tclsh examples/echo_server.tcl ?port? ?workers? ?myaddr?
#
# Defaults: port 8888, 4 workers, address 127.0.0.1 (give 0.0.0.0 to serve
# every IPv4 address, as the original did, or ::1 for IPv6).  Then, e.g.:
#
#   $ printf 'hello\nquit\n' | nc 127.0.0.1 8888
#   12345 hello
#   12345 quit
#
# Each worker answers every line with "PID line"; a line "quit" or the end
# of input ends the connection, and the worker asks for the next one.
# Ctrl-C (SIGINT) or SIGTERM stops the parent, which kills and reaps its workers.

package require Tcl 8.6
package require Tclx
package require socketserver

fconfigure stdout -buffering line

lassign $argv port nworkers myaddr
if {$port eq ""} {set port 8888}
if {$nworkers eq ""} {set nworkers 4}
if {$myaddr eq ""} {set myaddr 127.0.0.1}
if {[llength $argv] > 3 || ![string is integer -strict $nworkers] || $nworkers < 1} {
    puts stderr "usage: [file tail [info script]] ?port? ?workers? ?myaddr?"
    exit 2
}

# --- worker ----------------------------------------------------------------

# Called with each connection handed to this worker.
proc handle_accept {chan ip port} {
    puts "worker [pid]: connection from $ip $port"
    fconfigure $chan -blocking 0 -buffering line -translation {auto lf} -encoding utf-8
    fileevent $chan readable [list handle_readable $chan]
}

proc handle_readable {chan} {
    if {[catch {gets $chan line} n] || ($n < 0 && [eof $chan])} {
        done $chan
        return
    }
    if {$n < 0} return   ;# only part of a line so far
    catch {puts $chan "[pid] $line"}
    if {[string trim $line] eq "quit"} {done $chan}
}

# Close this connection; now we are ready for another one.
proc done {chan} {
    puts "worker [pid]: connection closed"
    catch {close $chan}
    ::socketserver::socket client -port $::port handle_accept
}

# Leave if the parent dies without stopping us.
proc watch_parent {parent} {
    if {[id process parent] != $parent} {exit 0}
    after 1000 [list watch_parent $parent]
}

proc worker {parent} {
    signal default {SIGINT SIGTERM}   ;# Ctrl-C reaches the whole process group
    puts "worker [pid] started"
    ::socketserver::socket client -port $::port handle_accept
    watch_parent $parent
    vwait forever
}

# --- parent ----------------------------------------------------------------

# Bind and listen now; the dispatcher thread accepts once a worker is ready.
if {[catch {::socketserver::socket server -myaddr $myaddr $port} port]} {
    puts stderr "echo_server: $port"
    exit 1
}

set parent [pid]
set workers {}
for {set i 0} {$i < $nworkers} {incr i} {
    flush stdout
    set child [fork]
    if {$child == 0} {
        worker $parent
        exit 0
    }
    lappend workers $child
}

puts "echo server on $myaddr port $port, workers [join $workers {, }]; Ctrl-C stops it"

signal trap {SIGINT SIGTERM} {set ::stop %S}
# Wake at least once a second; also notice workers that died on their own.
proc tick {} {
    foreach child $::workers {
        if {[catch {wait -nohang $child} status] || $status ne ""} {
            puts "worker $child exited"
            set ::workers [lsearch -all -inline -not -exact $::workers $child]
        }
    }
    after 1000 tick
}
tick
vwait ::stop

puts "$::stop: stopping workers $workers"
catch {::socketserver::socket close $port}
foreach child $workers {catch {kill SIGTERM $child}}
foreach child $workers {
    # wait at most 2 s for each, then SIGKILL
    for {set t 0} {$t < 100} {incr t} {
        if {[catch {wait -nohang $child} status] || $status ne ""} break
        after 20
    }
    if {$t == 100} {
        catch {kill SIGKILL $child}
        catch {wait $child}
    }
}
exit 0
