#!/usr/bin/env tclsh
# examples/http_server.tcl -- an HTTP/1.1 server with keep-alive, on a self-running worker pool.
#
#   tclsh examples/http_server.tcl ?-myaddr 127.0.0.1? ?-port 8080? ?-workers 4?
#       ?-maxconnections 1000? ?-timeout 30000? ?-queue 0? ?-keepalive park|hold|off?
#       ?-wait head? ?-idletimeout 60000? ?-headertimeout 10000? ?-maxparked n?
#       ?-maxbody 1048576? ?-systemd name | -fd n?
#
# The process binds the port with `::socketserver::socket server` and starts a
# pool with `::socketserver::pool create`: it becomes the pool's monitor and
# serves no connection itself.  The pool forks the workers (no Tclx needed),
# replaces any that dies, retires each one after -maxconnections connections
# (a handed-back connection counts each time a worker takes it; 0: never) and starts a fresh one in its place, and kills a worker that has
# held one connection for more than -timeout ms (0: never).
#
# The dispatcher holds every connection that has nothing for a worker to do
# ("parks" it): with -wait head (the default here) a fresh connection reaches a
# worker only once its request head has arrived, so idle and slow clients cost
# no worker.  It closes a parked connection that stays silent for
# -idletimeout ms, or that starts a request head and does not finish it within
# -headertimeout ms (0: never).  At most -maxparked connections are parked
# (default: half the open-files limit).  See `socket server` in the man page.
#
# A worker takes one connection at a time.  This handler is driven by
# fileevents: it reads a request (request line, headers, a Content-Length
# body), answers it with a Content-Length, and then, if the connection is to
# be kept alive (HTTP/1.1 unless the client sent `Connection: close`;
# HTTP/1.0 only if it sent `Connection: keep-alive`), by -keepalive:
#   park   hands the connection back to the dispatcher until the client sends
#          its next request, which any worker then serves (the default);
#          `socket park` returns 0 instead when the next request is already
#          buffered (pipelined): this worker serves it in place
#   hold   keeps it and waits for the next request, for at most -idletimeout
#          ms: the worker is tied to the client meanwhile (Apache prefork);
#          keep -idletimeout below -timeout, which counts that wait as busy
#   off    closes it after every response (HTTP/1.0 style)
# Closing or parking the channel is what tells the pool the worker can take
# the next connection.  A worker drops a client that takes longer than
# -headertimeout ms to send the rest of a request it has started.
#
#   GET|HEAD /       200, "hello from socketserver worker PID" (fixed length)
#   any  /echo       200, the request's body
#   otherwise        404; malformed requests get 400, 413, 431 or 501 and the
#                    connection is closed
#
# Signals (the pool is created with -signals 1):
#   Ctrl-C (SIGINT) or SIGTERM   stop: no new connections, busy workers finish
#                                (up to 5 s), every worker is reaped, exit 0
#   SIGHUP                       reload: fresh workers start, then the old ones
#                                finish what they hold and exit
#
# `make demo` runs it on 127.0.0.1:8080 with 4 workers.  Use -port 0 for a
# port the kernel chooses (the startup line tells which).  The file can also
# be sourced for its handler (`app::accept`, settings in `app::config`): the
# server part runs only when it is the script tclsh runs.

package require Tcl 8.6
package require socketserver

# ---------------------------------------------------------------------------
# The worker's side: the pool calls `app::accept chan ip port` for each
# connection, in the worker process.  Only one connection is open at a time.

namespace eval app {
    # Settings; the server part below sets them from the command line.
    variable config [dict create keepalive park idletimeout 60000 headertimeout 10000 \
                         maxbody 1048576]
    variable served 0           ;# requests this worker has answered
    variable conn               ;# array: chan -> the connection's state (see Reset)
    array set conn {}
    variable limits {line 8192 headers 100}
}

proc app::accept {chan ip port} {
    fconfigure $chan -blocking 0 -buffering full -translation binary
    Reset $chan
    Started $chan ;# a worker gets a connection when it has something to read
    fileevent $chan readable [namespace code [list readable $chan]]
}

# Starts waiting for the next request on chan (see Started).
proc app::Reset {chan} {
    variable conn
    if {[info exists conn($chan)]} {
        after cancel [dict get $conn($chan) timer]
    }
    set conn($chan) [dict create phase idle request {} version {} headers {} count 0 \
                         body {} length 0 timer {}]
    if {[dict get $app::config keepalive] eq "hold"} {
        Timer $chan idletimeout ;# the worker is the keep-alive timer here
    }
}

# A request has begun: the client has -headertimeout ms to send the rest.
proc app::Started {chan} {
    variable conn
    dict set conn($chan) phase head
    Timer $chan headertimeout
}

proc app::Timer {chan setting} {
    variable conn
    after cancel [dict get $conn($chan) timer]
    set ms [dict get $app::config $setting]
    dict set conn($chan) timer [expr {$ms > 0 ? [after $ms [namespace code [list finish $chan]]] : ""}]
}

# Reads what has arrived; answers every complete request (several, when they were pipelined).
proc app::readable {chan} {
    variable conn
    variable limits
    while {[info exists conn($chan)]} {
        set state $conn($chan)
        if {[dict get $state phase] eq "body"} {
            set want [expr {[dict get $state length] - [string length [dict get $state body]]}]
            if {[catch {read $chan $want} data]} {finish $chan; return}
            dict append conn($chan) body $data
            if {[string length $data] < $want} {
                if {[eof $chan]} {finish $chan}
                return ;# wait for the rest of the body
            }
            if {![respond $chan]} {return}
            continue
        }
        if {[catch {gets $chan line} n]} {finish $chan; return}  ;# e.g. reset by peer
        if {[dict get $state phase] eq "idle" && ($n >= 0 || [chan pending input $chan] > 0)} {
            Started $chan
        }
        if {$n < 0} {
            if {[eof $chan]} {
                finish $chan
            } elseif {[chan pending input $chan] > [dict get $limits line]} {
                reject $chan 431 "Request Header Fields Too Large"
            }
            return  ;# wait for the rest of the line
        }
        set line [string trimright $line \r]
        if {[dict get $state request] eq ""} {
            if {$line eq ""} {continue} ;# blank lines before a request are ignored
            if {![regexp {^([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/(1\.[01])$} $line -> method target version]} {
                reject $chan 400 "Bad Request"
                return
            }
            dict set conn($chan) request [list $method $target]
            dict set conn($chan) version $version
        } elseif {$line ne ""} {
            dict incr conn($chan) count
            if {[dict get $conn($chan) count] > [dict get $limits headers]
                    || [string length $line] > [dict get $limits line]} {
                reject $chan 431 "Request Header Fields Too Large"
                return
            }
            if {![regexp {^([^:\s]+):\s*(.*?)\s*$} $line -> name value]} {
                reject $chan 400 "Bad Request"
                return
            }
            set headers [dict get $conn($chan) headers] ;# name -> list of values
            dict lappend headers [string tolower $name] $value
            dict set conn($chan) headers $headers
        } elseif {![headComplete $chan]} {
            return
        } elseif {[dict get $conn($chan) phase] ne "body" && ![respond $chan]} {
            return
        }
    }
}

# The head has been read: checks how long the body is and, if there is one, reads on for it
# (phase body).  Returns 0 if the request was rejected, else 1.
proc app::headComplete {chan} {
    variable conn
    set headers [dict get $conn($chan) headers]
    if {[dict get $conn($chan) version] eq "1.1" && ![dict exists $headers host]} {
        reject $chan 400 "Bad Request" ;# RFC 9112: a 1.1 request must name its host
        return 0
    }
    if {[dict exists $headers transfer-encoding]} {
        reject $chan 501 "Not Implemented" ;# no chunked bodies: the message end is unknown
        return 0
    }
    set length 0
    if {[dict exists $headers content-length]} {
        set lengths [lsort -unique [dict get $headers content-length]]
        if {[llength $lengths] != 1 || ![regexp {^[0-9]{1,15}$} [lindex $lengths 0]]} {
            reject $chan 400 "Bad Request"
            return 0
        }
        scan [lindex $lengths 0] %d length
    }
    if {$length > [dict get $app::config maxbody]} {
        reject $chan 413 "Content Too Large"
        return 0
    }
    dict set conn($chan) length $length
    if {$length == 0} {
        return 1
    }
    dict set conn($chan) phase body
    if {[dict get $conn($chan) version] eq "1.1" && [dict exists $headers expect]
            && [string tolower [dict get $headers expect]] eq "100-continue"} {
        catch {puts -nonewline $chan "HTTP/1.1 100 Continue\r\n\r\n"; flush $chan}
    }
    return 1
}

# Answers the request read; then closes the connection or keeps it (see -keepalive).
# Returns 1 if this worker reads on (a pipelined request is buffered), else 0.
proc app::respond {chan} {
    variable conn
    variable served
    incr served
    set state $conn($chan)
    lassign [dict get $state request] method target
    set path [lindex [split $target ?] 0]
    set status "200 OK"
    if {$path eq "/echo"} {
        set body [dict get $state body]
    } elseif {$path eq "/" && $method in {GET HEAD}} {
        # The same length from every worker (the pid is padded), so benchmark
        # clients such as `ab` see a fixed-length document.
        set body [format "hello from socketserver worker %-7d\n" [pid]]
    } else {
        set status "404 Not Found"
        set body "not found: $path\n"
    }
    set tokens [string tolower [join [dict get [dict merge {connection {}} [dict get $state headers]] connection] ,]]
    set tokens [lmap token [split $tokens ,] {string trim $token}]
    if {[dict get $state version] eq "1.1"} {
        set keep [expr {"close" ni $tokens}]
    } else {
        set keep [expr {"keep-alive" in $tokens}] ;# HTTP/1.0 keep-alive is opt-in
    }
    if {[dict get $app::config keepalive] eq "off"} {
        set keep 0
    }
    set head "HTTP/1.1 $status\r\nContent-Type: text/plain; charset=utf-8\r\n"
    append head "Content-Length: [string length $body]\r\nX-Worker-Requests: $served\r\n"
    if {!$keep} {
        append head "Connection: close\r\n"
    } elseif {[dict get $state version] eq "1.0"} {
        append head "Connection: keep-alive\r\n"
    }
    append head \r\n
    if {$method ne "HEAD"} {
        append head $body
    }
    if {[catch {puts -nonewline $chan $head}] || !$keep} {
        finish $chan
        return 0
    }
    Reset $chan
    if {[dict get $app::config keepalive] eq "hold"} {
        if {[catch {flush $chan}]} {
            finish $chan
            return 0
        }
        return 1 ;# reads on: a pipelined request is served now, a later one when it comes
    }
    # Park: `socket park` flushes the response, then hands the connection to the dispatcher
    # and closes chan (1), or refuses because the next request is already buffered (0).
    if {[catch {::socketserver::socket park $chan} parked]} {
        finish $chan ;# it could not go back: the response is sent, the connection ends
        return 0
    }
    if {$parked} {
        unset conn($chan)
        return 0
    }
    Started $chan
    return 1
}

# A request that will not be served: answer with an error status and close.
proc app::reject {chan code reason} {
    set body "$code $reason\n"
    catch {
        puts -nonewline $chan "HTTP/1.1 $code $reason\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: [string length $body]\r\nConnection: close\r\n\r\n$body"
    }
    finish $chan
}

# Close the connection (a non-blocking close flushes in the background).  The
# pool notices the close and gives this worker its next connection.
proc app::finish {chan} {
    variable conn
    if {[info exists conn($chan)]} {
        after cancel [dict get $conn($chan) timer]
        unset conn($chan)
    }
    catch {fileevent $chan readable {}}
    catch {close $chan}
}

# ---------------------------------------------------------------------------
# The monitor: bind, start the pool, wait until a signal stops it.

if {[file normalize [info script]] ne [file normalize $::argv0]} {
    return ;# sourced for the handler
}

fconfigure stdout -buffering line

proc usage {{why ""}} {
    if {$why ne ""} {puts stderr "http_server: $why"}
    puts stderr "usage: [file tail [info script]] ?-myaddr addr? ?-port port? ?-workers n?\
                 ?-maxconnections n? ?-timeout ms? ?-queue n? ?-keepalive park|hold|off?\
                 ?-wait none|data|head? ?-idletimeout ms? ?-headertimeout ms? ?-maxparked n?\
                 ?-maxbody bytes? ?-systemd name? ?-fd n?"
    exit 2
}

array set opt {
    -myaddr 127.0.0.1 -port 8080 -workers 4 -maxconnections 1000 -timeout 30000 -queue 0
    -keepalive park -wait head -idletimeout 60000 -headertimeout 10000 -maxparked {}
    -maxbody 1048576 -systemd {} -fd {}
}
if {[llength $argv] % 2} {usage "option without value: [lindex $argv end]"}
foreach {name value} $argv {
    if {![info exists opt($name)]} {usage "unknown option \"$name\""}
    set opt($name) $value
}
if {![string is integer -strict $opt(-workers)] || $opt(-workers) < 1 || $opt(-workers) > 256} {
    usage "-workers must be an integer from 1 to 256"
}
if {$opt(-keepalive) ni {park hold off}} {
    usage "-keepalive must be park, hold or off"
}
foreach name {-idletimeout -headertimeout -maxbody} {
    if {![string is entier -strict $opt($name)] || $opt($name) < 0} {
        usage "$name must be a non-negative integer"
    }
}
dict set app::config keepalive $opt(-keepalive)
dict set app::config idletimeout $opt(-idletimeout)
dict set app::config headertimeout $opt(-headertimeout)
dict set app::config maxbody $opt(-maxbody)

# The pool's log (workers replaced, reloads, stop).  A log command must not
# fail: with stdout gone (a closed terminal or pipe) the message is dropped.
proc log {message} {
    catch {puts "[clock format [clock seconds] -format %T] $message"}
}

set serveropts [list -myaddr $opt(-myaddr) -queue $opt(-queue) -wait $opt(-wait) \
                    -idletimeout $opt(-idletimeout) -headertimeout $opt(-headertimeout)]
if {$opt(-maxparked) ne ""} {
    lappend serveropts -maxparked $opt(-maxparked)
}
# Under a service manager (socket activation): serve the socket it passed (-systemd name, * for
# the first) or an inherited fd (-fd n) instead of binding -myaddr/-port.
if {$opt(-systemd) ne "" || $opt(-fd) ne ""} {
    set serveropts [lrange $serveropts 2 end]
    lappend serveropts {*}[expr {$opt(-fd) ne "" ? [list -fd $opt(-fd)] : [list -systemd $opt(-systemd)]}]
    set opt(-port) 0
}
if {[catch {::socketserver::socket server {*}$serveropts $opt(-port)} port]} {
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

set address [dict get [::socketserver::info $port] address] ;# an adopted socket's own
set host [expr {[string match *:* $address] ? "\[$address\]" : $address}]
set url http://$host:$port/
set pids [dict keys [dict get [$pool stats] workers]]
puts "serving on $url with [llength $pids] workers (pids [join $pids {, }]),\
      monitor pid [pid] -- try: curl $url"
puts "Ctrl-C stops it; kill -HUP [pid] reloads the workers"

$pool wait

set stats [$pool stats]
log "workers respawned [dict get $stats respawned], recycled [dict get $stats recycled],\
     killed for -timeout [dict get $stats timeouts]; reloads [dict get $stats reloads]"
log "connections parked [dict get $stats parkedtotal], handed back [dict get $stats handedback],\
     closed idle [dict get $stats closedidle], closed on header timeout [dict get $stats closedheader]"
exit 0
