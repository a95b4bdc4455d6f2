# common.tcl --
#
#	Shared set-up and helpers for the socketserver tcltest suite.  Every
#	tests/*.test file sources this file first.
#
#	The test process is the *serving* process: it calls
#	`::socketserver::socket server`, then forks workers with Tclx `fork`
#	(workers must be forked from the serving process to inherit its
#	dispatcher socket) and drives real TCP clients on 127.0.0.1 / ::1.
#
#	Rules the helpers enforce:
#	  - every wait is bounded (ss::wait_until, ss::client_wait, ss::wcall,
#	    ss::run_fresh, ss::reap all take a limit in ms);
#	  - a forked child never returns into tcltest: its body runs under
#	    catch and the child always ends with `exit`;
#	  - every child is killed by pid (SIGKILL) and reaped (ss::reap);
#	  - a worker also exits by itself when its control connection to the
#	    test process closes (the test process died) or after a hard
#	    lifetime, so nothing outlives the suite.
#
#	Control channel.  The test process cannot read a worker's memory, so
#	each worker keeps one plain Tcl TCP connection to a control listener
#	of the test process (127.0.0.1, kernel-chosen port).  Over it the test
#	process evaluates scripts in the worker (ss::wcall) -- e.g. to read
#	`::socketserver::info` or to arm `client` at a chosen moment -- without
#	making a socketserver connection (which would itself count as a
#	delivery and a wake-up).  Workers also answer the request line "STATS"
#	on a delivered connection with their info dict (plus pid and fd count).

if {[info exists ::ss::loaded]} {
    return
}

package require Tcl 8.6
package require tcltest 2.5
namespace import -force ::tcltest::*
::tcltest::configure {*}$::argv

package require Tclx
package require socketserver

# When run by all.tcl, put this test file and its workers in their own
# process group so that all.tcl can kill a hung file with everything it
# forked (by that group's id, which is this process's pid).
if {[info exists ::env(SOCKETSERVER_TEST_PGROUP)]} {
    catch {id process group set}
}

namespace eval ::ss {
    variable loaded 1
    variable role test          ;# "test" in the test process, "worker" in a child
    variable pids {}            ;# children forked by this process, not yet reaped
    variable ctlsrv ""          ;# control listener (test process)
    variable ctlport 0
    variable wchan              ;# array: worker pid -> control channel
    array set wchan {}
    variable chanpid            ;# array: control channel -> worker pid
    array set chanpid {}
    variable initfail           ;# array: worker pid -> error of its start script
    array set initfail {}
    variable reply              ;# array: wcall id -> {code result}
    array set reply {}
    variable seq 0
    variable wake 0
    variable cl                 ;# array: client state, keys "$k,field"
    array set cl {}
    variable cseq 0
    variable bgerrors {}
    variable lifetime 180000    ;# hard upper bound on a worker's life (ms)

    # Worker-side state (meaningful in a forked child).
    variable ctlchan ""
    variable forever ""
    variable served 0
    variable peers {}
}

# --------------------------------------------------------------------
# Waiting

# ss::wait_until cond ?ms? --
#	Runs the event loop until the expression `cond` (evaluated in the
#	caller's frame) is true or `ms` milliseconds have passed.  Returns 1
#	if the condition became true, 0 on timeout.  Event handlers of this
#	file set ::ss::wake so the condition is re-checked at once; states
#	that have no event (e.g. ::socketserver::info counters) are re-checked
#	every 10 ms.
proc ::ss::wait_until {cond {ms 5000}} {
    set deadline [expr {[clock milliseconds] + $ms}]
    while 1 {
        if {[uplevel 1 [list expr $cond]]} {
            return 1
        }
        if {[clock milliseconds] >= $deadline} {
            return 0
        }
        set id [after 10 [list set ::ss::wake 1]]
        vwait ::ss::wake
        after cancel $id
    }
}

# ss::sinfo port key --
#	One field of ::socketserver::info for port.
proc ::ss::sinfo {port key} {
    dict get [::socketserver::info $port] $key
}

# ss::wait_ready port n ?ms? --
#	Waits until the dispatcher of port reports at least n ready workers.
proc ::ss::wait_ready {port n {ms 5000}} {
    if {![wait_until {[::ss::sinfo $port ready] >= $n} $ms]} {
        error "timeout: [::ss::sinfo $port ready] of $n workers ready on port $port after $ms ms: [::socketserver::info $port]"
    }
    return
}

# --------------------------------------------------------------------
# File descriptors

# ss::fdcount --
#	Number of open file descriptors of this process.
proc ::ss::fdcount {} {
    llength [glob -nocomplain -directory /proc/[pid]/fd *]
}

# ss::settle port ?ms? --
#	Waits until the dispatcher of port (in this process) is quiet: every
#	accepted connection confirmed delivered and none queued.  Between a
#	delivery and its confirmation the dispatcher still holds the accepted
#	fd, so fd counts are compared only when settled.
proc ::ss::settle {port {ms 5000}} {
    wait_until {[::ss::quiet $port]} $ms
}

proc ::ss::quiet {port} {
    set i [::socketserver::info $port]
    expr {[dict get $i accepted] == [dict get $i delivered] && [dict get $i queued] == 0}
}

# ss::stable_fdcount ?ms? --
#	This process's fd count once it reads the same three times in a row,
#	10 ms apart (bounded): a transient fd of another thread is not a leak.
proc ::ss::stable_fdcount {{ms 1000}} {
    set deadline [expr {[clock milliseconds] + $ms}]
    set last [fdcount]
    set same 1
    while {$same < 3 && [clock milliseconds] < $deadline} {
        set id [after 10 [list set ::ss::wake 1]]
        vwait ::ss::wake
        after cancel $id
        set n [fdcount]
        if {$n == $last} {
            incr same
        } else {
            set last $n
            set same 1
        }
    }
    return $last
}

# ss::socket_fds --
#	Dict fd -> link target ("socket:[inode]") of this process's sockets.
proc ::ss::socket_fds {} {
    set d [dict create]
    foreach f [glob -nocomplain -directory /proc/[pid]/fd *] {
        if {![catch {file readlink $f} target] && [string match socket:* $target]} {
            dict set d [file tail $f] $target
        }
    }
    return $d
}

# ss::exec_child_fds --
#	Execs a child (find) that lists its own open fds; returns a dict
#	fd -> link target as the child saw them.  The child gets stdin from
#	/dev/null and stdout on a pipe; fds 0-2 are reported too.
proc ::ss::exec_child_fds {} {
    set out [exec find /proc/self/fd/ -mindepth 1 -maxdepth 1 -printf "%f %l\n" </dev/null 2>/dev/null]
    set d [dict create]
    foreach line [split $out \n] {
        if {[regexp {^(\d+) (.*)$} $line -> fd target]} {
            dict set d $fd $target
        }
    }
    return $d
}

# ss::exec_child_sockets --
#	Socket link targets that an exec'd child of this process inherits
#	on fds >= 3.
proc ::ss::exec_child_sockets {} {
    set s {}
    dict for {fd target} [exec_child_fds] {
        if {$fd >= 3 && [string match socket:* $target]} {
            lappend s $target
        }
    }
    return [lsort $s]
}

# Sockets an exec'd child inherits before this file did anything with
# socketserver (e.g. leaked to us by whoever started the tests); they are
# not ours to blame.
set ::ss::exec_baseline [::ss::exec_child_sockets]

# --------------------------------------------------------------------
# Standard worker handler

# ss::handler rearm port chan ip cport --
#	A HANDLER prefix: [list ::ss::handler REARM PORT].  Records the
#	delivery, re-arms at once when REARM is true, then answers one line
#	without ever blocking:
#	  "STATS" -> the info dict of PORT plus pid and fds (this process);
#	  "PEER"  -> pid, the ip and port given to the handler, and the
#	             channel's -peername and -sockname;
#	  other   -> "PID LINE".
proc ::ss::handler {rearm port chan ip cport} {
    incr ::ss::served
    lappend ::ss::peers [list $ip $cport]
    if {$rearm} {
        ::socketserver::socket client -port $port [list ::ss::handler $rearm $port]
    }
    fconfigure $chan -blocking 0 -buffering line -translation lf -encoding utf-8
    fileevent $chan readable [list ::ss::handler_line $port $chan $ip $cport]
}

proc ::ss::handler_line {port chan ip cport} {
    if {[catch {gets $chan line} n]} {
        catch {close $chan}
        return
    }
    if {$n < 0} {
        if {[eof $chan]} {
            close $chan
        }
        return
    }
    switch -exact -- $line {
        STATS {
            set answer [dict merge [::socketserver::info $port] \
                            [dict create pid [pid] fds [::ss::fdcount]]]
        }
        PEER {
            set answer [list [pid] $ip $cport \
                            [fconfigure $chan -peername] [fconfigure $chan -sockname]]
        }
        default {
            set answer "[pid] $line"
        }
    }
    catch {puts $chan $answer}
    catch {close $chan}
}

# ss::serve port --
#	Makes this process a worker serving port forever (re-arming handler).
proc ::ss::serve {port} {
    ::socketserver::socket client -port $port [list ::ss::handler 1 $port]
}

# --------------------------------------------------------------------
# Control channel (test process side)

proc ::ss::encode {s} {
    binary encode base64 [encoding convertto utf-8 $s]
}

proc ::ss::decode {s} {
    encoding convertfrom utf-8 [binary decode base64 $s]
}

proc ::ss::ctl_start {} {
    variable ctlsrv
    variable ctlport
    if {$ctlsrv ne ""} {
        return
    }
    set ctlsrv [socket -server ::ss::ctl_accept -myaddr 127.0.0.1 0]
    set ctlport [lindex [fconfigure $ctlsrv -sockname] 2]
}

proc ::ss::ctl_accept {chan addr port} {
    fconfigure $chan -blocking 0 -buffering line -translation lf -encoding utf-8
    fileevent $chan readable [list ::ss::ctl_read $chan]
}

proc ::ss::ctl_read {chan} {
    variable wchan
    variable chanpid
    variable reply
    variable initfail
    while 1 {
        if {[catch {gets $chan line} n] || ($n < 0 && [eof $chan])} {
            ctl_forget $chan
            break
        }
        if {$n < 0} {
            break
        }
        switch -- [lindex $line 0] {
            HELLO {
                set p [lindex $line 1]
                set wchan($p) $chan
                set chanpid($chan) $p
            }
            FAIL {
                set initfail([lindex $line 1]) [lindex $line 2]
            }
            R {
                set reply([lindex $line 1]) \
                    [list [lindex $line 2] [decode [lindex $line 3]]]
            }
        }
    }
    set ::ss::wake 1
}

proc ::ss::ctl_forget {chan} {
    variable wchan
    variable chanpid
    catch {close $chan}
    if {[info exists chanpid($chan)]} {
        unset -nocomplain wchan($chanpid($chan))
        unset chanpid($chan)
    }
    set ::ss::wake 1
}

# ss::wcall pid script ?ms? --
#	Evaluates script at global level in worker pid and returns its
#	result (or raises its error).  Bounded by ms.
proc ::ss::wcall {pid script {ms 5000}} {
    variable wchan
    variable reply
    variable seq
    if {![info exists wchan($pid)]} {
        error "no control connection to worker $pid"
    }
    set id [incr seq]
    puts $wchan($pid) [list E $id [encode $script]]
    if {![wait_until {[info exists ::ss::reply($id)] || ![info exists ::ss::wchan($pid)]} $ms]} {
        error "worker $pid did not answer within $ms ms"
    }
    if {![info exists reply($id)]} {
        error "worker $pid went away"
    }
    lassign $reply($id) code result
    unset reply($id)
    return -code $code $result
}

# ss::winfo pid port --
#	::socketserver::info of port as seen by worker pid.
proc ::ss::winfo {pid port} {
    wcall $pid [list ::socketserver::info $port]
}

# --------------------------------------------------------------------
# Forking workers

# ss::fork_workers n script ?ms? --
#	Forks n children of this (serving) process.  Each evaluates script at
#	global level, reports HELLO over its control connection and then
#	stays in the event loop until killed or until the control connection
#	closes.  Returns the list of pids once every child said HELLO;
#	raises an error (after killing them) if one failed or took longer
#	than ms.
proc ::ss::fork_workers {n script {ms 5000}} {
    variable pids
    variable wchan
    variable initfail
    ctl_start
    flush stdout
    flush stderr
    set new {}
    for {set i 0} {$i < $n} {incr i} {
        set p [fork]
        if {$p == 0} {
            # Child: never return into tcltest.
            set code [catch {::ss::child_main $script} msg]
            if {$code == 1} {
                catch {puts stderr "socketserver test worker [pid]: $msg"}
            }
            exit 0
        }
        lappend pids $p
        lappend new $p
    }
    set ok [wait_until {[::ss::all_started $new]} $ms]
    set failed {}
    foreach p $new {
        if {[info exists initfail($p)]} {
            lappend failed "$p: $initfail($p)"
        }
    }
    if {!$ok || [llength $failed]} {
        reap $new
        if {[llength $failed]} {
            error "worker start script failed: [join $failed {; }]"
        }
        error "workers did not start within $ms ms"
    }
    return $new
}

proc ::ss::all_started {plist} {
    foreach p $plist {
        if {![info exists ::ss::wchan($p)] && ![info exists ::ss::initfail($p)]} {
            return 0
        }
    }
    return 1
}

# ss::child_main script --
#	Body of a forked child.  Drops what it inherited from the test
#	process that is not its own, connects back to the control listener,
#	runs script, says HELLO and serves events until told to stop, the
#	control connection closes, or the hard lifetime passes.
proc ::ss::child_main {script} {
    variable role worker
    variable pids {}
    variable ctlchan
    foreach a [after info] {
        after cancel $a
    }
    set keep [list stdin stdout stderr [::tcltest::outputChannel] [::tcltest::errorChannel]]
    foreach c [chan names] {
        if {$c ni $keep} {
            catch {close $c}
        }
    }
    array unset ::ss::wchan
    array unset ::ss::chanpid
    array unset ::ss::cl
    set ::ss::ctlsrv ""
    set ::ss::served 0
    set ::ss::peers {}
    set ::ss::bgerrors {}
    interp bgerror {} ::ss::child_bgerror
    set ctlchan [socket 127.0.0.1 $::ss::ctlport]
    fconfigure $ctlchan -blocking 0 -buffering line -translation lf -encoding utf-8
    fileevent $ctlchan readable ::ss::child_ctl
    after $::ss::lifetime [list set ::ss::forever lifetime]
    if {[catch {uplevel #0 $script} msg]} {
        puts $ctlchan [list FAIL [pid] $msg]
        flush $ctlchan
        return
    }
    puts $ctlchan [list HELLO [pid]]
    vwait ::ss::forever
}

proc ::ss::child_bgerror {msg opts} {
    lappend ::ss::bgerrors $msg
}

proc ::ss::child_ctl {} {
    variable ctlchan
    while 1 {
        if {[catch {gets $ctlchan line} n] || ($n < 0 && [eof $ctlchan])} {
            set ::ss::forever eof
            return
        }
        if {$n < 0} {
            return
        }
        lassign $line op id data
        switch -- $op {
            E {
                set code [catch {uplevel #0 [decode $data]} result]
                puts $ctlchan [list R $id $code [encode $result]]
            }
            X {
                set ::ss::forever exit
                return
            }
        }
    }
}

# ss::reap ?pids? ?ms? --
#	SIGKILLs the given children (default: all this process started and
#	has not reaped) and waits for each, bounded by ms.  Returns the pids
#	that could not be reaped in time (normally none).
proc ::ss::reap {{which all} {ms 5000}} {
    variable pids
    variable wchan
    if {$which eq "all"} {
        set which $pids
    }
    foreach p $which {
        catch {kill KILL $p}
        if {[info exists wchan($p)]} {
            ctl_forget $wchan($p)
        }
    }
    set deadline [expr {[clock milliseconds] + $ms}]
    set left $which
    while {[llength $left]} {
        set next {}
        foreach p $left {
            if {[catch {wait -nohang $p} r]} {
                continue            ;# already reaped / not a child
            }
            if {$r eq ""} {
                lappend next $p
            }
        }
        set left $next
        if {![llength $left] || [clock milliseconds] >= $deadline} {
            break
        }
        after 10                    ;# no event tells a child's death: poll
    }
    set keep {}
    foreach p $pids {
        if {$p ni $which || $p in $left} {
            lappend keep $p
        }
    }
    set pids $keep
    return $left
}

# ss::alive pid --
#	1 while pid exists (a zombie counts as gone).
proc ::ss::alive {pid} {
    if {![file exists /proc/$pid/stat]} {
        return 0
    }
    if {[catch {open /proc/$pid/stat} f]} {
        return 0
    }
    set stat [read $f]
    close $f
    # state is the field after "(comm)"
    set state [lindex [string range $stat [expr {[string last ) $stat] + 2}] end] 0]
    expr {$state ne "Z" && $state ne "X"}
}

# --------------------------------------------------------------------
# TCP clients (non-blocking, event driven, bounded)

# ss::client_open port ?line? ?-addr A? ?-myaddr A? --
#	Starts an asynchronous connection to A:port (default 127.0.0.1) and,
#	if line is not empty, queues line to be sent.  Returns a key for
#	client_send, client_wait, client_state and client_close.
proc ::ss::client_open {port {line ""} args} {
    variable cl
    variable cseq
    set addr 127.0.0.1
    set opts {}
    foreach {o v} $args {
        switch -- $o {
            -addr {set addr $v}
            -myaddr {lappend opts -myaddr $v}
            default {error "bad option $o"}
        }
    }
    set k [incr cseq]
    set s [socket -async {*}$opts $addr $port]
    fconfigure $s -blocking 0 -buffering line -translation lf -encoding utf-8
    set cl($k,chan) $s
    set cl($k,state) connecting
    set cl($k,sockname) ""
    set cl($k,reply) ""
    fileevent $s writable [list ::ss::client_writable $k]
    fileevent $s readable [list ::ss::client_readable $k]
    if {$line ne ""} {
        puts $s $line
    }
    return $k
}

proc ::ss::client_writable {k} {
    variable cl
    set s $cl($k,chan)
    fileevent $s writable {}
    set err [fconfigure $s -error]
    if {$err ne ""} {
        client_done $k "ERROR $err"
        return
    }
    catch {set cl($k,sockname) [fconfigure $s -sockname]}
    if {$cl($k,state) eq "connecting"} {
        set cl($k,state) connected
    }
    set ::ss::wake 1
}

proc ::ss::client_readable {k} {
    variable cl
    set s $cl($k,chan)
    if {$cl($k,sockname) eq ""} {
        catch {set cl($k,sockname) [fconfigure $s -sockname]}
    }
    if {[catch {gets $s line} n]} {
        client_done $k "ERROR $n"
    } elseif {$n >= 0} {
        client_done $k $line
    } elseif {[eof $s]} {
        client_done $k EOF
    }
}

proc ::ss::client_done {k reply} {
    variable cl
    set cl($k,reply) $reply
    set cl($k,state) done
    catch {close $cl($k,chan)}
    set ::ss::wake 1
}

# ss::client_send k line --
#	Sends line on an open client connection.
proc ::ss::client_send {k line} {
    variable cl
    puts $cl($k,chan) $line
}

# ss::client_state k --
#	connecting, connected or done.
proc ::ss::client_state {k} {
    set ::ss::cl($k,state)
}

proc ::ss::client_sockname {k} {
    set ::ss::cl($k,sockname)
}

# ss::all_in_state keys states --
proc ::ss::all_in_state {keys states} {
    foreach k $keys {
        if {$::ss::cl($k,state) ni $states} {
            return 0
        }
    }
    return 1
}

# ss::client_wait keys ?ms? --
#	Waits (bounded) until every client in keys has its reply line, EOF
#	or an error, and returns the replies in order; a client still
#	waiting at the deadline gets "TIMEOUT" and is closed.  Forgets the
#	keys.
proc ::ss::client_wait {keys {ms 5000}} {
    variable cl
    wait_until {[::ss::all_in_state $keys done]} $ms
    set replies {}
    foreach k $keys {
        if {$cl($k,state) ne "done"} {
            client_done $k TIMEOUT
        }
        lappend replies $cl($k,reply)
        array unset cl $k,*
    }
    return $replies
}

# ss::client_close keys --
#	Closes clients without waiting for a reply.
proc ::ss::client_close {keys} {
    variable cl
    foreach k $keys {
        if {[info exists cl($k,chan)]} {
            catch {close $cl($k,chan)}
        }
        array unset cl $k,*
    }
}

# ss::request port line ?ms? ?options? --
#	One connection: send line, return the reply line (or EOF, TIMEOUT,
#	"ERROR msg").
proc ::ss::request {port line {ms 5000} args} {
    lindex [client_wait [list [client_open $port $line {*}$args]] $ms] 0
}

# --------------------------------------------------------------------
# A fresh tclsh (no socketserver state at all)

# ss::run_fresh script ?ms? ?shell? --
#	Runs script in a new tclsh that has this process's auto_path, and
#	returns everything it printed (stdout and stderr).  Killed if it is
#	still running after ms.  With shell, a /bin/sh command line run
#	first that ends by exec'ing "$@" (the tclsh and the script), e.g.
#	{ulimit -n 64; exec "$@"}.
proc ::ss::run_fresh {script {ms 10000} {shell ""}} {
    set f [file tempfile path /tmp/socketserver-test.tcl]
    puts $f [list set ::auto_path $::auto_path]
    puts $f $script
    close $f
    set cmd [list [info nameofexecutable] $path]
    if {$shell ne ""} {
        set cmd [list /bin/sh -c $shell sh {*}$cmd]
    }
    set p [open |[list {*}$cmd 2>@1] r]
    fconfigure $p -blocking 0
    set ::ss::fresh($p) ""
    fileevent $p readable [list ::ss::fresh_read $p]
    if {![wait_until {[info exists ::ss::freshdone($p)]} $ms]} {
        catch {kill KILL [pid $p]}
        append ::ss::fresh($p) "\n(killed after $ms ms)"
    }
    fconfigure $p -blocking 1
    catch {close $p}
    file delete $path
    set out $::ss::fresh($p)
    unset -nocomplain ::ss::fresh($p) ::ss::freshdone($p)
    return [string trim $out]
}

proc ::ss::fresh_read {p} {
    append ::ss::fresh($p) [read $p]
    if {[eof $p]} {
        fileevent $p readable {}
        set ::ss::freshdone($p) 1
        set ::ss::wake 1
    }
}

# --------------------------------------------------------------------
# Background errors in the test process

proc ::ss::record_bgerror {msg opts} {
    lappend ::ss::bgerrors [list $msg [dict get $opts -errorcode]]
    set ::ss::wake 1
}

# Unexpected background errors are shown, never silently dropped.
proc ::ss::report_bgerror {msg opts} {
    puts stderr "background error in test process: $msg\n[dict get $opts -errorinfo]"
}
interp bgerror {} ::ss::report_bgerror

# ss::report text --
#	A line of information in the test output (e.g. the spread of
#	connections over workers).
proc ::ss::report {text} {
    puts [::tcltest::outputChannel] "    $text"
    flush [::tcltest::outputChannel]
}

# --------------------------------------------------------------------
# Constraints

# ipv6: the loopback ::1 is usable here.
::tcltest::testConstraint ipv6 [expr {![catch {close [socket -server list -myaddr ::1 0]}]}]

# privPortDenied: binding port 80 as an unprivileged user is refused.
# As root we fork a fresh tclsh that drops to uid/gid 65534 (nobody)
# before trying, so the test runs as root too.
proc ::ss::unprivileged_port_start {} {
    if {[catch {open /proc/sys/net/ipv4/ip_unprivileged_port_start} f]} {
        return 1024
    }
    set v [string trim [read $f]]
    close $f
    return $v
}
::tcltest::testConstraint privPortDenied [expr {[::ss::unprivileged_port_start] > 80}]

# Leftover children at the end of a file are killed; a test that leaves
# one behind is a test bug, so say so.
proc ::tcltest::cleanupTestsHook {} {
    if {$::ss::role eq "test" && [llength $::ss::pids]} {
        puts [::tcltest::outputChannel] "warning: children left behind, killing: $::ss::pids"
        ::ss::reap
    }
}

# --------------------------------------------------------------------
# ab in the background (bounded), for tests that act while it loads a
# server

# ss::ab_start url ?n? ?c? ?secs? --
#	Starts ab against url (at most n requests, c at a time, for at most
#	secs seconds) without blocking the event loop; returns a key for
#	ss::ab_result.
proc ::ss::ab_start {url {n 1000} {c 8} {secs 20}} {
    variable ab
    set k [incr ::ss::cseq]
    set chan [open |[list ab -r -q -s 10 -t $secs -n $n -c $c $url 2>@1] r]
    fconfigure $chan -blocking 0
    set ab($k) [dict create chan $chan pid [pid $chan] output "" done 0]
    fileevent $chan readable [list ::ss::ab_read $k]
    return $k
}

proc ::ss::ab_read {k} {
    variable ab
    set chan [dict get $ab($k) chan]
    dict append ab($k) output [read $chan]
    if {[eof $chan]} {
        fconfigure $chan -blocking 1
        if {[catch {close $chan} why]} {
            dict append ab($k) output "\n(ab: $why)"
        }
        dict set ab($k) done 1
        set ::ss::wake 1
    }
}

# ss::ab_result k ms --
#	Waits (bounded) for ab k to finish; returns {complete failed}, where
#	failed counts failed requests and non-2xx responses, a request cut
#	short by a reset once (ab counts it as a receive error and a wrong
#	length).  Kills ab and raises an error after ms.
proc ::ss::ab_result {k ms} {
    variable ab
    if {![wait_until {[dict get $::ss::ab($k) done]} $ms]} {
        catch {kill KILL [dict get $ab($k) pid]}
        catch {close [dict get $ab($k) chan]}
        unset ab($k)
        error "ab did not finish in $ms ms"
    }
    set output [dict get $ab($k) output]
    unset ab($k)
    if {![regexp {Complete requests:\s+(\d+)} $output -> complete]
            || ![regexp {Failed requests:\s+(\d+)} $output -> failed]} {
        error "unexpected ab output: $output"
    }
    if {$failed > 0 && [regexp {Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)} \
            $output -> connect receive length exceptions]} {
        set failed [expr {max($connect + $receive + $exceptions, $length)}]
    }
    if {[regexp {Non-2xx responses:\s+(\d+)} $output -> non2xx]} {
        incr failed $non2xx
    }
    return [list $complete $failed]
}

# ss::pause ms --
#	Runs the event loop for ms milliseconds (spaces out actions; nothing
#	waits on it for correctness).
proc ::ss::pause {ms} {
    set deadline [expr {[clock milliseconds] + $ms}]
    wait_until {[clock milliseconds] >= $deadline} [expr {$ms + 100}]
}

# ss::pool_serving pool --
#	The pids of pool's workers that are registered and serving (ready or
#	busy in its stats).
proc ::ss::pool_serving {pool} {
    set pids {}
    dict for {pid w} [dict get [$pool stats] workers] {
        if {[dict get $w state] in {ready busy}} {
            lappend pids $pid
        }
    }
    return $pids
}

# ss::pool_active pool --
#	The pids pool counts toward its size (not retiring).
proc ::ss::pool_active {pool} {
    set pids {}
    dict for {pid w} [dict get [$pool stats] workers] {
        if {[dict get $w state] ne "retiring"} {
            lappend pids $pid
        }
    }
    return $pids
}

# ss::wait_serving pool n ?ms? --
#	Waits until pool has exactly n active workers, all serving.
proc ::ss::wait_serving {pool n {ms 10000}} {
    if {![wait_until {[llength [::ss::pool_active $pool]] == $n
                      && [llength [::ss::pool_serving $pool]] == $n} $ms]} {
        error "pool did not get $n serving workers in $ms ms: [$pool stats]"
    }
}
