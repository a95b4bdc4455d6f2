# bench/http.tcl -- the one HTTP/1.0 answer every Tcl benchmark server gives.
#
# Sourced by plain_server.tcl and ss_server.tcl, so both do exactly the same
# work per connection.  Two handlers (`{*}HANDLER chan ip port`, for socket
# -server or ::socketserver::socket client) with the same work: read the
# request line and the headers to the blank line (at most 100 header lines),
# answer "200 OK" with Content-Length and Connection: close, close.  A request
# for /slow first blocks the process for 5 ms (`after 5`), as a synchronous
# Tcl handler would (the slow-mix scenario).
#
#   ::bench::accept       fileevent-driven, non-blocking reads.  What a
#                         single-process server must do (plain): a blocking
#                         read would stall every client behind a slow one.
#   ::bench::accept_sync  blocking reads, straight through.  What a
#                         pre-forked worker does (socketserver's default): it
#                         serves one connection at a time, so a slow client
#                         blocks only its own worker, and it saves the
#                         fileevent wake-ups, each a round trip through Tcl
#                         8.6's notifier thread (measured: ~59 against ~105
#                         µs CPU and 3.6 against 6.7 context switches per
#                         connection).
#
# Keep-alive (HTTP/1.1, the parked-connection rows of issue 11): the same
# parse, answered "HTTP/1.1 200 OK" with Content-Length, and the connection
# kept for the next request unless the client asked otherwise (HTTP/1.1
# without "Connection: close", or HTTP/1.0 with "Connection: keep-alive").
#
#   ::bench::accept_ka    fileevent-driven, the plain keep-alive server: the
#                         connection stays in this process's event loop.
#   ::bench::accept_park  synchronous, for socketserver workers: after each
#                         answer the connection goes back to the dispatcher
#                         (::socketserver::socket park) and the worker is free;
#                         if park refuses (a pipelined request is already
#                         read ahead), the worker serves that one itself.
#
# When a connection is finished (closed or parked), ::bench::done (a command
# prefix, empty by default) runs: the socketserver worker re-arms there.

namespace eval ::bench {
    variable response "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
    variable done {}
    variable path               ;# array: chan -> request path, once the request line is read
    variable lines              ;# array: chan -> header lines read so far
    variable ka                 ;# array: chan -> {version connection} of a keep-alive
                                ;# channel's request being read (accept_ka's channels only)
    array set path {}
    array set lines {}
    array set ka {}
}

# Does a request of this HTTP VERSION with this Connection header value keep
# its connection open after the answer?
proc ::bench::keep_alive {version connection} {
    set tokens [split [string tolower [string map {" " ""} $connection]] ,]
    if {$version eq "HTTP/1.1"} {
        return [expr {"close" ni $tokens}]
    }
    return [expr {"keep-alive" in $tokens}]
}

# The keep-alive handlers' answer.
proc ::bench::reply {keep} {
    return "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection:\
            [expr {$keep ? "keep-alive" : "close"}]\r\n\r\nok\n"
}

proc ::bench::accept {chan ip port} {
    fconfigure $chan -blocking 0 -buffering full -translation {auto binary} -encoding iso8859-1
    fileevent $chan readable [list ::bench::readable $chan]
}

proc ::bench::accept_ka {chan ip port} {
    variable ka
    set ka($chan) {}
    accept $chan $ip $port
}

proc ::bench::readable {chan} {
    variable path
    variable lines
    variable ka
    # Bounded: each gets consumes a line of what one read brought in, and a
    # request may have at most 100 header lines.
    while {[gets $chan line] >= 0} {
        if {![info exists path($chan)]} {
            set path($chan) [lindex [split $line " "] 1]
            set lines($chan) 0
            if {[info exists ka($chan)]} {
                set ka($chan) [list [lindex [split $line " "] 2] {}]
            }
        } elseif {$line eq ""} {
            if {![answer $chan]} {
                return
            }
        } elseif {[incr lines($chan)] > 100} {
            break                   ;# not a request we serve: drop it
        } elseif {[info exists ka($chan)]
                && [regexp -nocase {^connection:[ \t]*(.*)$} $line -> value]} {
            lset ka($chan) 1 $value
        }
    }
    if {[eof $chan] || ([info exists lines($chan)] && $lines($chan) > 100)} {
        # The client went away before the blank line, or sent too much.
        unset -nocomplain path($chan) lines($chan) ka($chan)
        catch {close $chan}
        finished
    }
}

# Answers the request read on CHAN; 1 if the connection stays open for the
# next one (keep-alive), 0 if it was closed.
proc ::bench::answer {chan} {
    variable path
    variable lines
    variable response
    variable ka
    if {$path($chan) eq "/slow"} {
        after 5
    }
    unset path($chan) lines($chan)
    if {[info exists ka($chan)] && [keep_alive {*}$ka($chan)]} {
        set ka($chan) {}
        if {![catch {
            fconfigure $chan -blocking 1
            puts -nonewline $chan [reply 1]
            flush $chan
            fconfigure $chan -blocking 0
        }]} {
            return 1
        }
    }
    set answer [expr {[info exists ka($chan)] ? [reply 0] : $response}]
    unset -nocomplain ka($chan)
    fileevent $chan readable {}
    catch {
        fconfigure $chan -blocking 1
        puts -nonewline $chan $answer
        flush $chan
    }
    catch {close $chan}
    finished
    return 0
}

# The synchronous handler: the whole connection in one call.
proc ::bench::accept_sync {chan ip port} {
    variable response
    catch {
        fconfigure $chan -blocking 1 -buffering full -translation {auto binary} \
            -encoding iso8859-1
        # The request line, then the headers to the blank line; bounded: at
        # most 100 header lines, and gets returns -1 at the end of the input.
        if {[gets $chan line] > 0} {
            set path [lindex [split $line " "] 1]
            set n 0
            while {[set len [gets $chan line]] > 0 && [incr n] <= 100} {}
            # Answer only a complete request: it ended with the blank line
            # (not with the end of the input, nor with too many headers).
            if {$len == 0 && $n <= 100} {
                if {$path eq "/slow"} {
                    after 5
                }
                puts -nonewline $chan $response
                flush $chan
            }
        }
    }
    catch {close $chan}
    finished
}

# The synchronous keep-alive handler: serve requests until the client wants
# the connection closed, or park it after an answer.
proc ::bench::accept_park {chan ip port} {
    set parked 0
    catch {
        fconfigure $chan -blocking 1 -buffering full -translation {auto binary} \
            -encoding iso8859-1
        # Bounded as accept_sync's; each turn serves one request that is
        # already here (park refused it: it was read ahead).
        while {[gets $chan line] > 0} {
            lassign [split $line " "] method path version
            set connection ""
            set n 0
            while {[set len [gets $chan line]] > 0 && [incr n] <= 100} {
                regexp -nocase {^connection:[ \t]*(.*)$} $line -> connection
            }
            if {$len != 0 || $n > 100} {
                break
            }
            if {$path eq "/slow"} {
                after 5
            }
            set keep [keep_alive $version $connection]
            puts -nonewline $chan [reply $keep]
            flush $chan
            if {!$keep} {
                break
            }
            if {[::socketserver::socket park $chan]} {
                set parked 1
                break
            }
        }
    }
    if {!$parked} {
        catch {close $chan}
    }
    finished
}

proc ::bench::finished {} {
    variable done
    if {[llength $done]} {
        {*}$done
    }
}

# A bounded wait for stdin's end: when the driver goes away (or closes our
# stdin), the server stops.  STOP is a command prefix.
proc ::bench::watch_stdin {stop} {
    fconfigure stdin -blocking 0
    fileevent stdin readable [list ::bench::stdin_readable $stop]
}

proc ::bench::stdin_readable {stop} {
    if {[catch {read stdin 4096}] || [eof stdin]} {
        fileevent stdin readable {}
        {*}$stop
    }
}
