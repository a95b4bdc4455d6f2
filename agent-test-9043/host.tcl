set ::auto_path {/work/main/build /usr/share/tcltk/tcl8.6 /usr/share/tcltk /usr/lib /usr/local/lib/tcltk /usr/local/share/tcltk /usr/lib/tcltk/x86_64-linux-gnu /usr/lib/tcltk /usr/lib/tcltk/tcl8.6 /usr/lib/tclx8.4}

    package require socketserver
    lassign $argv addr workers draintime work
    proc http {chan ip port} {
        fconfigure $chan -translation crlf
        gets $chan request
        if {$request eq "HOLD"} {
            gets $chan
            close $chan
            return
        }
        while {[gets $chan line] > 0} {}
        after $::work
        set body "ok\n"
        puts -nonewline $chan "HTTP/1.0 200 OK\nContent-Length: [string length $body]\n\n"
        fconfigure $chan -translation binary
        puts -nonewline $chan $body
        close $chan
    }
    proc log {message} {lappend ::log $message}
    set log {}
    set port [::socketserver::socket server -myaddr $addr -agent 0 -backlog 256 0]
    set pool [::socketserver::pool create -port $port -workers $workers -log log  -draintime $draintime -grace 5000 http]
    set deadline [expr {[clock milliseconds] + 10000}]
    while {[llength [dict get [::socketserver::info $port] workers]] < $workers
            && [clock milliseconds] < $deadline} {
        after 10 {set ::tick 1}
        vwait ::tick
    }
    fconfigure stdout -buffering line
    puts [list ports $port [dict get [::socketserver::info $port] agentport]  [dict keys [dict get [$pool stats] workers]]]
    proc command {} {
        if {[gets stdin line] < 0} {
            exit 0
        }
        switch -- $line {
            info {puts [list info [::socketserver::info $::port]]}
            stop {$::pool stop; puts [list stopped $::log]}
            quit {catch {$::pool stop -grace 1000}; exit 0}
            drain - undrain {
                puts [list drained [::socketserver::socket drain $::port [expr {$line eq "drain"}]]]
            }
        }
    }
    fileevent stdin readable command
    vwait forever

