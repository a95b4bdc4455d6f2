# bench/plain_server.tcl -- the "plain" configuration: one Tcl process with
# Tcl's own `socket -server`, what Tcl users run today.
#
#   tclsh bench/plain_server.tcl ?-keepalive? ?PORT?
#
# Listens on 127.0.0.1:PORT (default 0: a port the kernel chooses) and prints
# one line, "port PORT pid PID workers {}", then serves until its stdin ends,
# or until SIGTERM (default action).  The answer is bench/http.tcl's, from its
# fileevent-driven handler ::bench::accept: one process serves every client,
# so it must not block reading one of them.  With -keepalive it speaks
# HTTP/1.1 and keeps connections open between requests (::bench::accept_ka):
# the anchor for socketserver's parked keep-alive connections (issue 11).

source [file join [file dirname [file normalize [info script]]] http.tcl]

proc main {argv} {
    set handler ::bench::accept
    if {[lindex $argv 0] eq "-keepalive"} {
        set handler ::bench::accept_ka
        set argv [lrange $argv 1 end]
    }
    set port [expr {[llength $argv] ? [lindex $argv 0] : 0}]
    set listener [socket -server $handler -myaddr 127.0.0.1 $port]
    set port [lindex [fconfigure $listener -sockname] 2]
    puts "port $port pid [pid] workers {}"
    flush stdout
    ::bench::watch_stdin [list set ::forever 1]
    vwait ::forever
    close $listener
}

main $argv
