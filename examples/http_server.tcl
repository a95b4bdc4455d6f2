#!/usr/bin/env tclsh
# examples/http_server.tcl -- an HTTP/1.0 responder served by pre-forked workers.
#
#   tclsh examples/http_server.tcl ?-myaddr 127.0.0.1? ?-port 8080? ?-workers 4? ?-queue 0?
#
# The parent binds the port with `::socketserver::socket server` and forks the
# workers with Tclx `fork`; it serves no connection itself.  Each worker asks for
# one connection at a time with `::socketserver::socket client`, reads the
# request line and headers up to the blank line, answers `200 OK` with a body
# naming its pid, closes the connection and asks for the next one.
#
# Ctrl-C (SIGINT) or SIGTERM stops it: the parent closes the port, sends its
# workers SIGTERM, reaps them (SIGKILL for any that linger) and exits 0.
# Workers that die on their own are reaped and reported; if none is left the
# parent exits 1.  (Respawning is the pool's job: see issue 4.)
# `make demo` runs it on 127.0.0.1:8080 with 4 workers.  Use -port 0 for a
# port the kernel chooses (the startup line tells which).

package require Tcl 8.6
package require Tclx
package require socketserver

fconfigure stdout -buffering line

proc usage {{why ""}} {
    if {$why ne ""} {puts stderr "http_server: $why"}
    puts stderr "usage: [file tail [info script]] ?-myaddr addr? ?-port port? ?-workers n? ?-queue n?"
    exit 2
}

array set opt {-myaddr 127.0.0.1 -port 8080 -workers 4 -queue 0}
if {[llength $argv] % 2} {usage "option without value: [lindex $argv end]"}
foreach {name value} $argv {
    if {![info exists opt($name)]} {usage "unknown option \"$name\""}
    set opt($name) $value
}
if {![string is integer -strict $opt(-workers)] || $opt(-workers) < 1 || $opt(-workers) > 256} {
    usage "-workers must be an integer from 1 to 256"
}

# ---------------------------------------------------------------------------
# Worker: one connection at a time, driven by fileevents.

namespace eval worker {
    variable port     ;# the served port
    variable parent   ;# the parent's pid: leave if it goes away
    variable served 0 ;# requests answered by this worker
    variable conn     ;# conn($chan) = dict of request line, header count, timer
    variable timeout 10000  ;# ms a client may take to send its request
}

proc worker::run {servedPort parentPid} {
    variable port $servedPort
    variable parent $parentPid
    # The terminal's Ctrl-C reaches the whole process group: a worker just
    # ends (the parent reaps it), whatever dispositions it inherited.
    signal default {SIGINT SIGTERM}
    watchParent
    arm
    vwait forever
}

# Ask for the next connection: `accept` runs once one is handed over.
proc worker::arm {} {
    variable port
    if {[catch {::socketserver::socket client -port $port [namespace code accept]} msg]} {
        puts stderr "worker [pid]: $msg"
        exit 1
    }
}

# Leave if the parent died without stopping us (e.g. it was SIGKILLed).
proc worker::watchParent {} {
    variable parent
    if {[id process parent] != $parent} {exit 0}
    after 1000 [namespace code watchParent]
}

proc worker::accept {chan ip port} {
    variable conn
    variable timeout
    fconfigure $chan -blocking 0 -buffering full -translation {auto binary}
    set conn($chan) [dict create request "" headers 0 \
        timer [after $timeout [namespace code [list finish $chan]]]]
    fileevent $chan readable [namespace code [list readable $chan]]
}

# Read the request line and the headers up to the blank line, then answer.
proc worker::readable {chan} {
    variable conn
    while {1} {
        if {[catch {gets $chan line} n]} {finish $chan; return}  ;# e.g. reset by peer
        if {$n < 0} {
            if {[eof $chan] || [chan pending input $chan] > 8192} {finish $chan}
            return  ;# wait for the rest of the line
        }
        if {[dict get $conn($chan) request] eq ""} {
            if {$line ne ""} {dict set conn($chan) request $line}  ;# skip leading blank lines
        } elseif {$line eq ""} {
            respond $chan
            return
        } elseif {[dict get [dict incr conn($chan) headers] headers] > 100} {
            finish $chan   ;# not a request we want
            return
        }
    }
}

proc worker::respond {chan} {
    variable conn
    variable served
    incr served
    set method [lindex [split [dict get $conn($chan) request]] 0]
    set body [encoding convertto utf-8 "hello from socketserver worker [pid]\n"]
    set head "HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
    append head "Content-Length: [string length $body]\r\n"
    append head "X-Worker-Requests: $served\r\nConnection: close\r\n\r\n"
    if {$method ne "HEAD"} {append head $body}
    catch {puts -nonewline $chan $head}
    finish $chan
}

# Close the connection (a non-blocking close flushes in the background) and
# ask for the next one.
proc worker::finish {chan} {
    variable conn
    after cancel [dict get $conn($chan) timer]
    unset conn($chan)
    catch {fileevent $chan readable {}}
    catch {close $chan}
    arm
}

# ---------------------------------------------------------------------------
# Parent: bind, fork the workers, wait for a signal, stop them.

if {[catch {
    ::socketserver::socket server -myaddr $opt(-myaddr) -queue $opt(-queue) $opt(-port)
} port]} {
    puts stderr "http_server: $port"
    exit 1
}

set parent [pid]
set workers {}
for {set i 0} {$i < $opt(-workers)} {incr i} {
    flush stdout
    flush stderr
    set child [fork]
    if {$child == 0} {
        worker::run $port $parent
        exit 0
    }
    lappend workers $child
}

# Reap workers that die on their own, so none is left a zombie.
proc reap {} {
    global workers
    foreach child $workers {
        if {[catch {wait -nohang $child} status]} {
            set why "is gone"
        } elseif {$status ne ""} {
            set why "exited: [lrange $status 1 end]"   ;# EXIT code or SIG name
        } else {
            continue
        }
        puts "worker $child $why"
        set workers [lsearch -all -inline -not -exact $workers $child]
    }
    if {![llength $workers]} {
        puts "no workers left"
        set ::stop "no workers"
        return
    }
    after 1000 reap
}

# SIGTERM each worker, wait up to 3 s for it, then SIGKILL what is left.
proc stopWorkers {} {
    global workers
    foreach child $workers {catch {kill SIGTERM $child}}
    set deadline [expr {[clock milliseconds] + 3000}]
    while {[llength $workers] && [clock milliseconds] < $deadline} {
        foreach child $workers {
            if {[catch {wait -nohang $child} status] || $status ne ""} {
                set workers [lsearch -all -inline -not -exact $workers $child]
            }
        }
        if {[llength $workers]} {after 20}
    }
    foreach child $workers {
        catch {kill SIGKILL $child}
        catch {wait $child}
    }
    set workers {}
}

set host [expr {[string match *:* $opt(-myaddr)] ? "\[$opt(-myaddr)\]" : $opt(-myaddr)}]
set url http://$host:$port/
puts "serving on $url with [llength $workers] workers (pids [join $workers {, }])\
      -- try: curl $url"
puts "Ctrl-C stops the server and its workers"

signal trap {SIGINT SIGTERM} {set ::stop %S}
after 1000 reap
vwait ::stop

after cancel reap
puts "\n$::stop: stopping"
if {![catch {::socketserver::info $port} info]
        && [dict exists $info accepted] && [dict exists $info delivered]} {
    puts "accepted [dict get $info accepted], delivered [dict get $info delivered]"
}
catch {::socketserver::socket close $port}
stopWorkers
puts "stopped"
exit [expr {$::stop eq "no workers" ? 1 : 0}]
